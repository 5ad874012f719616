"""Whole runs of the current code (defaults: every speed option on) against an older checkout of pgp_peft.

`bench_run.py` compares the current code with its speed options off and on; what the speed issue asked
for is a comparison with the code as it was when the issue was filed. This script runs the §5 protocol
(5 tasks, `common.PROTOCOL`, eval batch 128, 1 torch thread) once per process, alternating old and new
code in rounds (a fresh random order per round), each in its own subprocess with `PYTHONPATH` pointing at
that tree's `src`. Each process first runs one whole run as a warm-up and reports the second. The old
code may have no phase timings, so the same calls are timed from outside in both trees: `train()`,
`update_memory()` and `evaluate_task()`, CPU time of the process.
Accuracy matrices are not compared (older code may initialise differently).

    git worktree add --detach /tmp/pgp-old 2a8e190^
    python benchmarks/bench_baseline.py /tmp/pgp-old     # -> results/run_baseline.json
    git worktree remove /tmp/pgp-old
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("l2p", "dualprompt")
PHASES = ("train", "memory", "evaluation", "other", "total")
ROUNDS = 3


def _child(bench_dir: str, method: str) -> None:
    """One warm-up run and one timed run in this process's pgp_peft; prints the timed run's JSON."""
    import copy
    import tempfile
    import time

    sys.path.insert(0, bench_dir)
    import common
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    import pgp_peft
    from pgp_peft import ContinualTrainer, get_pgp_model

    common.set_threads()
    protocol = common.PROTOCOL
    splits, _ = common.make_splits(
        "fashion_mnist", protocol["train_per_class"], protocol["test_per_class"], 0
    )
    backbone = common.shipped_backbone()

    def run() -> dict[str, float]:
        torch.manual_seed(0)
        model = get_pgp_model(copy.deepcopy(backbone), common.make_config(method, True))
        train_tf, eval_tf = common.transforms()
        with tempfile.TemporaryDirectory(prefix="pgp_bench_baseline_") as tmp:
            args = TrainingArguments(  # common.training_arguments (older trees may not have it)
                output_dir=tmp,
                per_device_train_batch_size=protocol["batch_size"],
                per_device_eval_batch_size=128,
                num_train_epochs=protocol["epochs"],
                learning_rate=protocol["learning_rate"],
                lr_scheduler_type="constant",
                optim="adamw_torch",
                weight_decay=0.0,
                max_grad_norm=protocol["max_grad_norm"],
                seed=0,
                logging_strategy="no",
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                remove_unused_columns=False,
                use_cpu=True,
                dataloader_num_workers=0,
            )
            trainer = ContinualTrainer(
                model, args, splits=splits, train_transform=train_tf, eval_transform=eval_tf
            )
            trainer.remove_callback(PrinterCallback)
            seconds = dict.fromkeys(("train", "memory", "evaluation"), 0.0)

            def timed(name: str, function):
                def wrapper(*args, **kwargs):
                    started = time.process_time()
                    try:
                        return function(*args, **kwargs)
                    finally:
                        seconds[name] += time.process_time() - started

                return wrapper

            for name, attribute in (
                ("train", "train"),
                ("memory", "update_memory"),
                ("evaluation", "evaluate_task"),
            ):
                setattr(trainer, attribute, timed(name, getattr(trainer, attribute)))
            started = time.process_time()
            trainer.train_continual()
            total = time.process_time() - started
        seconds["other"] = total - sum(seconds.values())
        seconds["total"] = total
        return seconds

    run()
    print(json.dumps({"pgp_peft": pgp_peft.__file__, "cpu_seconds": run()}))


def _one_run(tree: Path, method: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(tree / "benchmarks"), method],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"run of {tree} ({method}) failed:\n{done.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if not report["pgp_peft"].startswith(str(tree / "src")):
        raise RuntimeError(f"{tree}: imported pgp_peft from {report['pgp_peft']} (an installed copy?)")
    return report["cpu_seconds"]


def main(old_tree: str) -> None:
    import common
    import numpy as np

    trees = {"old": Path(old_tree).resolve(), "current": HERE.parent}
    commits = {
        name: subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for name, tree in trees.items()
    }
    rng = random.Random(0)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {t: [] for t in trees} for m in METHODS}
    for round_index in range(ROUNDS):
        order = [(m, t) for m in METHODS for t in trees]
        rng.shuffle(order)
        for method, name in order:
            common.log(f"baseline: round {round_index + 1}/{ROUNDS} {method} {name}")
            runs[method][name].append(_one_run(trees[name], method))
    summary: dict[str, Any] = {}
    for method in METHODS:
        old, current = runs[method]["old"], runs[method]["current"]
        summary[method] = {}
        for phase in PHASES:
            ratios = [c[phase] / o[phase] for c, o in zip(current, old) if o[phase] > 0]
            summary[method][phase] = {
                "old_median_seconds": float(np.median([o[phase] for o in old])),
                "current_median_seconds": float(np.median([c[phase] for c in current])),
                "ratio": {
                    "median": float(np.median(ratios)),
                    "min": float(min(ratios)),
                    "max": float(max(ratios)),
                },
            }
    common.write_json(
        "run_baseline.json",
        {
            "benchmark": "run_baseline",
            "commits": commits,
            "rounds": ROUNDS,
            "protocol": common.PROTOCOL,
            "runs": runs,
            "summary": summary,
            "environment": common.environment(),
        },
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit("usage: python benchmarks/bench_baseline.py OLD_WORKTREE")
