"""Render benchmarks/results/*.json into the generated sections of benchmarks/README.md.

Every number in README.md between `<!-- BEGIN GENERATED:name -->` and `<!-- END GENERATED:name -->`
comes from here; nothing in those blocks is edited by hand.

    python benchmarks/make_report.py [--total-seconds S --stages results/logs/stages.tsv]
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
README = Path(os.environ.get("BENCH_README", HERE / "README.md"))

METHOD_NAMES = {"l2p": "L2P", "dualprompt": "DualPrompt"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "digits": "digits (scikit-learn)"}
BACKBONE_NAMES = {"pretrained": "pretrained (CIFAR-10)", "random": "random init"}


def load(name: str):
    import json

    path = RESULTS / name
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def mean_std(values, digits: int = 1) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return f"{array.mean():.{digits}f} ± {std:.{digits}f}"


def mb(num_bytes) -> str:
    return f"{num_bytes / 2**20:.2f}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


MIN_EFFECT = {"points": 1.0, "ratio": 0.05}  # smaller effects are reported but never called better / worse


def paired(runs, method, metric, lower_is_better: bool, as_ratio: bool = False):
    """PGP vs baseline per seed -> (mean, std, n, verdict): the difference PGP - baseline in points, or
    with `as_ratio` the ratio PGP / baseline. 'better' / 'worse' needs n >= 2, |effect| > 2 std / sqrt(n)
    and |effect| >= MIN_EFFECT (1 point; 5 % for ratios)."""
    by_seed = {}
    for run in runs:
        if run["method"] == method:
            by_seed.setdefault(run["seed"], {})[run["use_pgp"]] = run[metric]
    pairs = [(v[True], v[False]) for v in by_seed.values() if True in v and False in v]
    if not pairs:
        return None
    if as_ratio:
        values = np.asarray([a / b for a, b in pairs if b], dtype=float)
        effect_of = lambda x: x - 1.0  # noqa: E731
        floor = MIN_EFFECT["ratio"]
    else:
        values = np.asarray([a - b for a, b in pairs], dtype=float)
        effect_of = lambda x: x  # noqa: E731
        floor = MIN_EFFECT["points"]
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    effect = effect_of(mean)
    clear = values.size >= 2 and abs(effect) > 2 * std / math.sqrt(values.size) and abs(effect) >= floor
    better = (effect < 0) if lower_is_better else (effect > 0)
    verdict = ("better" if better else "worse") if clear else "within noise"
    return mean, std, int(values.size), verdict


# ----------------------------------------------------------------------------- sections
def section_environment(total_seconds, stages) -> str:
    envs = [p for p in ("cost.json", "scaling.json", "forgetting_fashion_mnist.json") if load(p)]
    if not envs:
        return "_no results yet: run `make -C benchmarks bench`_"
    run_all = load("run_all.json")
    env = run_all["environment"] if run_all else load(envs[0])["environment"]
    rows = [
        ["date", env["date_utc"]],
        ["machine", f"{env['nproc']} CPU cores ({env['cpu_model']}), load average (1/5/15 min) at the end "
                    f"{env['load_average_1_5_15']} (cores shared with other jobs)"],
        ["torch threads per process", f"{env['torch_threads_per_process']} (the accuracy grids run 2 worker processes)"],
        ["versions", f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
                     f"datasets {env['datasets']}, accelerate {env['accelerate']}, numpy {env['numpy']}, "
                     f"scikit-learn {env['scikit-learn']}, pgp_peft {env['pgp_peft']} (git {env['git_commit']}, "
                     "with uncommitted work tree)"],
    ]  # fmt: skip
    if run_all:
        total_seconds, stages = run_all["total_seconds"], run_all["stages"]
        cpu = run_all.get("cpu_seconds_children")
        detail = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in (stages or {}).items())
        rows.append(["wall time of `run_all.sh`", f"**{total_seconds / 60:.1f} min** ({detail})"])
        if cpu:
            rows.append([
                "CPU time of `run_all.sh`",
                f"{cpu / 60:.1f} CPU-min (wall time × 2 cores = {2 * total_seconds / 60:.1f} core-min available; the "
                "rest went to other jobs on the shared cores)",
            ])  # fmt: skip
    return table(["", ""], rows, "ll")


def section_protocol() -> str:
    payload = load("forgetting_fashion_mnist.json") or load("forgetting_digits.json")
    if not payload:
        return "_no results yet_"
    p = payload["protocol"]
    sources = set()
    for name in ("forgetting_fashion_mnist.json", "forgetting_digits.json"):
        data = load(name)
        if data:
            sources.update(data["data_source"])
    rows = [
        ["tasks", f"{p['num_tasks']} × {p['classes_per_task']} classes, class order {p['class_order']}, class-IL"],
        ["data per task", f"{2 * p['train_per_class']} training / {2 * p['test_per_class']} test images "
                          "(a seeded balanced subset drawn per seed), 32×32 RGB, [0, 1], no augmentation"],
        ["data sources", "; ".join(sorted(sources))],
        ["training", f"{p['epochs']} epochs per task, batch {p['batch_size']}, Adam lr {p['learning_rate']} "
                     f"(constant), grad-norm clip {p['max_grad_norm']}, fresh optimizer per task"],
        ["methods", "paper presets (`PromptGradientProjectionConfig.l2p()` / `.dualprompt()`), num_classes 10; "
                    f"PGP: feature mode, memory_samples {p['memory_samples']}, ε = config defaults"],
        ["seeds", ", ".join(str(s) for s in payload["seeds"]) + " (prompt/key/head init, data order, data subset)"],
    ]  # fmt: skip
    return table(["", ""], rows, "ll")


def forgetting_runs():
    runs = []
    for name in ("forgetting_fashion_mnist.json", "forgetting_digits.json"):
        data = load(name)
        if data:
            runs.extend(data["runs"])
    return runs


def section_forgetting() -> str:
    runs = forgetting_runs()
    if not runs:
        return "_no results yet_"
    header = [
        "data", "backbone", "method", "avg acc ↑", "forgetting (paper) ↓", "forgetting (ref. code) ↓",
        "task-0 logit drift ↓", "task-0 feature drift ↓", "task-0 prompt choice changed", "new-task acc",
        "task-IL avg acc",
    ]  # fmt: skip
    rows = []
    for dataset in ("fashion_mnist", "digits"):
        for kind in ("pretrained", "random"):
            for method in ("l2p", "dualprompt"):
                for use_pgp in (False, True):
                    group = [
                        r for r in runs
                        if (r["dataset"], r["backbone"], r["method"], r["use_pgp"]) == (dataset, kind, method, use_pgp)
                    ]  # fmt: skip
                    if not group:
                        continue
                    name = METHOD_NAMES[method] + ("-PGP" if use_pgp else "")
                    rows.append([
                        DATASET_NAMES[dataset], BACKBONE_NAMES[kind], f"**{name}**" if use_pgp else name,
                        mean_std([r["average_accuracy"] for r in group]),
                        mean_std([r["forgetting_paper"] for r in group]),
                        mean_std([r["forgetting_reference"] for r in group]),
                        mean_std([r["task0_logit_drift"] for r in group], 3),
                        mean_std([r["task0_feature_drift"] for r in group], 3),
                        mean_std([100 * r["task0_prompt_selection_changed"] for r in group], 0) + " %",
                        mean_std([r["new_task_accuracy"] for r in group]),
                        mean_std([r["task_il_average_accuracy"] for r in group]),
                    ])  # fmt: skip
    n = len({r["seed"] for r in runs})
    return (
        f"Mean ± standard deviation over {n} seeds; accuracies in %, after the 5th task. Drift = "
        "‖z_end − z_after task 0‖ / ‖z_after task 0‖ over the task-0 test images (logits of the task-0 "
        "classes, or the head's input features). Prompt choice changed: share of task-0 test images whose "
        "selected prompt set (by key) differs between after task 0 and the end. New-task acc = class-IL accuracy on each task right after "
        "learning it (tasks 2–5, plasticity).\n\n" + table(header, rows, "lll" + "r" * 8)
    )


def section_head_init_change() -> str:
    """§1 before and after the head-initialisation fix (results/before_head_init/: the §1 JSON of the
    run made with torch's default `nn.Linear` head, kept for this comparison)."""
    before = []
    for name in ("forgetting_fashion_mnist.json", "forgetting_digits.json"):
        data = load(f"before_head_init/{name}")
        if data:
            before.extend(data["runs"])
    after = forgetting_runs()
    if not before or not after:
        return "_no before/after results_"
    metrics = [("average_accuracy", "avg acc"), ("forgetting_paper", "forgetting (paper)"),
               ("new_task_accuracy", "new-task acc"), ("task_il_average_accuracy", "task-IL avg acc")]  # fmt: skip
    header = ["data", "backbone", "method"] + [f"{label}: before → after" for _, label in metrics]
    rows = []
    for dataset in ("fashion_mnist", "digits"):
        for kind in ("pretrained", "random"):
            for method in ("l2p", "dualprompt"):
                for use_pgp in (False, True):
                    key = (dataset, kind, method, use_pgp)
                    old = [
                        r for r in before if (r["dataset"], r["backbone"], r["method"], r["use_pgp"]) == key
                    ]
                    new = [
                        r for r in after if (r["dataset"], r["backbone"], r["method"], r["use_pgp"]) == key
                    ]
                    if not old or not new:
                        continue
                    name = METHOD_NAMES[method] + ("-PGP" if use_pgp else "")
                    cells = [
                        f"{mean_std([r[m] for r in old])} → {mean_std([r[m] for r in new])}"
                        for m, _ in metrics
                    ]
                    rows.append([DATASET_NAMES[dataset], BACKBONE_NAMES[kind], name, *cells])
    return (
        "Same protocol and seeds; *before*: the head kept torch's default `nn.Linear` init (U(±1/√D) "
        "weights and bias); *after*: timm's ViT head init, as the reference (trunc-normal std 0.02, zero "
        "bias). Mean ± std over seeds, in %.\n\n" + table(header, rows, "lll" + "r" * len(metrics))
    )


def section_verdict() -> str:
    runs = forgetting_runs()
    if not runs:
        return "_no results yet_"
    metrics = [  # key, label, lower is better, digits, as ratio
        ("average_accuracy", "Δ avg acc", False, 1, False),
        ("forgetting_paper", "Δ forgetting (paper)", True, 1, False),
        ("forgetting_reference", "Δ forgetting (ref.)", True, 1, False),
        ("task0_logit_drift", "logit drift PGP / no PGP", True, 2, True),
        ("new_task_accuracy", "Δ new-task acc", False, 1, False),
        ("task_il_average_accuracy", "Δ task-IL avg acc", False, 1, False),
    ]
    header = ["data", "backbone", "method"] + [m[1] for m in metrics]
    rows, counts = [], {m[0]: {"better": 0, "worse": 0, "within noise": 0} for m in metrics}
    cells = 0
    for dataset in ("fashion_mnist", "digits"):
        for kind in ("pretrained", "random"):
            for method in ("l2p", "dualprompt"):
                group = [r for r in runs if (r["dataset"], r["backbone"]) == (dataset, kind)]
                row = [DATASET_NAMES[dataset], BACKBONE_NAMES[kind], METHOD_NAMES[method]]
                found = False
                for key, _, lower, digits, as_ratio in metrics:
                    result = paired(group, method, key, lower, as_ratio)
                    if result is None:
                        row.append("–")
                        continue
                    found = True
                    mean, std, _, verdict = result
                    counts[key][verdict] += 1
                    mark = {"better": " ✅", "worse": " ❌", "within noise": ""}[verdict]
                    sign = "" if as_ratio else "+"
                    row.append(f"{mean:{sign}.{digits}f} ± {std:.{digits}f}{mark}")
                if found:
                    cells += 1
                    rows.append(row)
    lines = [
        "PGP vs the same method without PGP, paired by seed: the difference PGP − baseline in points "
        "(drift: the ratio PGP / baseline), mean ± std over seeds. ✅ / ❌: clearly better / worse, i.e. "
        f"|effect| > 2·std/√n **and** at least {MIN_EFFECT['points']:.0f} point ({100 * MIN_EFFECT['ratio']:.0f} % "
        "for the drift ratio); unmarked: within seed noise or too small to matter.",
        "",
        table(header, rows, "lll" + "r" * len(metrics)),
        "",
        f"In words (counted over the {cells} data × backbone × method cells above):",
        "",
    ]
    for key, label, _, _, _ in metrics:
        c = counts[key]
        lines.append(
            f"- {label.replace('Δ ', '').replace(' PGP / no PGP', '')}: PGP clearly better in {c['better']}, clearly worse in {c['worse']}, "
            f"within noise in {c['within noise']}."
        )
    return "\n".join(lines)


def sweep_runs():
    out = {}
    for method in ("l2p", "dualprompt"):
        data = load(f"thresholds_{method}.json")
        if data:
            out[method] = data
    return out


def section_thresholds() -> str:
    sweeps = sweep_runs()
    if not sweeps:
        return "_no results yet_"
    parts = []
    means: dict[str, dict] = {}
    for method, data in sweeps.items():
        header = [
            "ε", "avg acc ↑", "forgetting (paper) ↓", "forgetting (ref.) ↓", "new-task acc (plasticity) ↑",
            "new-task task-IL acc ↑", "task-0 logit drift ↓", "protected dims after 5 tasks",
        ]  # fmt: skip
        rows = []
        levels = [None] + data["thresholds"]
        for eps in levels:
            group = [r for r in data["runs"] if r["threshold"] == eps and r["use_pgp"] == (eps is not None)]
            if not group:
                continue
            ranks = [sum(r["memory_ranks"].values()) for r in group if r["memory_ranks"]]
            dims = next((sum(r["memory_dims"].values()) for r in data["runs"] if r.get("memory_dims")), None)
            label = (
                "no PGP" if eps is None else (f"**{eps}** (default)" if eps == data["default"] else str(eps))
            )
            rows.append([
                label,
                mean_std([r["average_accuracy"] for r in group]),
                mean_std([r["forgetting_paper"] for r in group]),
                mean_std([r["forgetting_reference"] for r in group]),
                mean_std([r["new_task_accuracy"] for r in group]),
                mean_std([r["new_task_accuracy_task_il"] for r in group]),
                mean_std([r["task0_logit_drift"] for r in group], 3),
                "–" if eps is None else f"{np.mean(ranks):.0f} / {dims}",
            ])  # fmt: skip
            means.setdefault(eps, {})[method] = {
                "acc": float(np.mean([r["average_accuracy"] for r in group])),
                "forg": float(np.mean([r["forgetting_paper"] for r in group])),
                "new": float(np.mean([r["new_task_accuracy"] for r in group])),
            }
        parts.append(
            f"**{METHOD_NAMES[method]}** ({data['backbone']}, Fashion-MNIST, seeds {data['seeds']}; "
            f"{'prompt_threshold = key_threshold = ε' if method == 'l2p' else 'prompt_threshold = ε (DualPrompt has no key space)'})"
            "\n\n" + table(header, rows)
        )
    # recommendation: the eps with the best average accuracy, averaged over both methods and all seeds
    candidates = {eps: v for eps, v in means.items() if eps is not None and len(v) == len(sweeps)}
    if candidates:
        score = {eps: float(np.mean([m["acc"] for m in v.values()])) for eps, v in candidates.items()}
        chosen = max(score, key=lambda eps: score[eps])
        default = 0.97
        lines = [
            "Rule: recommend the ε with the highest average accuracy after the last task, averaged over both "
            "methods and all seeds (the per-method tables above give the seed spread to judge it by).",
            "",
        ]
        rows = []
        for eps in sorted(score):
            v = candidates[eps]
            rows.append([
                f"**{eps}**" if eps == chosen else str(eps),
                f"{score[eps]:.1f}",
                f"{np.mean([m['forg'] for m in v.values()]):.1f}",
                f"{np.mean([m['new'] for m in v.values()]):.1f}",
            ])  # fmt: skip
        base = means.get(None)
        if base and len(base) == len(sweeps):
            rows.append([
                "no PGP",
                f"{np.mean([m['acc'] for m in base.values()]):.1f}",
                f"{np.mean([m['forg'] for m in base.values()]):.1f}",
                f"{np.mean([m['new'] for m in base.values()]):.1f}",
            ])  # fmt: skip
        lines.append(table(["ε", "avg acc (mean of methods)", "forgetting (paper)", "new-task acc"], rows))
        lines.append("")
        if chosen == default:
            lines.append(
                f"→ **Recommendation: keep the default ε = {default}** for prompt_threshold and key_threshold."
            )
        else:
            delta_acc = score[chosen] - score.get(default, float("nan"))
            lines.append(
                f"→ **Recommendation by this rule: ε = {chosen}** (instead of the default {default}): "
                f"{delta_acc:+.1f} points of average accuracy on this benchmark."
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def met(value: float, target: float) -> str:
    return "✅ met" if value <= target else "❌ missed"


def section_cost() -> str:
    data = load("cost.json")
    if not data:
        return "_no results yet_"
    out = []
    rows = []
    for s in data["step"]:
        r = s["paired_round_ratio"]
        rows.append([
            METHOD_NAMES[s["method"]],
            f"{s['step_pgp_on']['median_ms']:.1f}",
            f"{s['step_pgp_off']['median_ms']:.1f}",
            f"**{r['median']:.3f}** ({r['p25']:.3f}–{r['p75']:.3f})",
            f"{s['ratio_of_medians']:.3f}",
            f"{s['projection_only_ms']:.3f} ({100 * s['projection_share_of_step']:.2f} %)",
            f"≤ {s['target']}: {met(r['median'], s['target'])}",
        ])  # fmt: skip
    out.append(
        f"**Training step, projection on vs off** ({data['model']}, batch {data['step'][0]['batch_size']}, "
        "32×32, bases after task 0; forward + backward + clip + project + Adam; interleaved rounds, "
        f"{data['step'][0]['step_pgp_on']['n']} steps per mode)\n\n"
        + table(
            [
                "method",
                "step on (ms, median)",
                "step off (ms)",
                "on/off: median of paired round ratios (IQR)",
                "ratio of medians",
                "projection alone (ms, share of step)",
                "target",
            ],
            rows,
        )  # fmt: skip
    )
    rows = []
    for m in data["memory_update"]:
        t = m["times"]
        r = m["ratio_update_vs_model_forward"]
        rows.append([
            METHOD_NAMES[m["method"]],
            f"{t['update_first_task']['median_ms']:.1f}",
            f"{t['update_later_task']['median_ms']:.1f}",
            f"{t['model_forward']['median_ms']:.1f}",
            f"{t['backbone_forward']['median_ms']:.1f}",
            f"**{r['median']:.2f}** ({r['p25']:.2f}–{r['p75']:.2f})",
            f"{m['ratio_later_update_vs_model_forward']['median']:.2f}",
            f"{m['ratio_update_vs_backbone_forward']['median']:.2f}",
            f"{m['ratio_update_vs_forward_with_decoding']['median']:.2f}",
            f"≤ {m['target']}: {met(r['median'], m['target'])}",
        ])  # fmt: skip
    first = data["memory_update"][0]
    out.append(
        f"**Task-boundary memory update vs a no-grad forward over the same {first['memory_samples']} memory "
        f"samples** (batches of {first['batch_size']}, tensors prepared beforehand; last-but-one column: "
        'both sides decoding the images through the DataLoader as the Trainer does). "Model forward" is the '
        'adapter\'s inference pass (frozen query pass + prompted pass); "backbone forward" is one plain '
        "pass of the frozen ViT.\n\n"
        + table(
            [
                "method",
                "update, first task (ms)",
                "update, later task (ms)",
                "model forward (ms)",
                "backbone forward (ms)",
                "update / model forward (IQR)",
                "later update / model fwd",
                "update / backbone fwd",
                "with decoding: update / fwd",
                "target",
            ],
            rows,
        )  # fmt: skip
    )
    rows = []
    for m, s in zip(data["memory_update"], data["step_peak_memory"]):
        p = m["peak_bytes"]
        rows.append([
            METHOD_NAMES[m["method"]],
            mb(s["peak_bytes_pgp_on"]), mb(s["peak_bytes_pgp_off"]), f"{s['ratio']:.3f}",
            mb(p["update_first_task"]), mb(p["model_forward"]), f"{m['peak_ratio_update_vs_model_forward']:.2f}",
            f"{m['num_spaces']} × {m['bases_buffer_bytes'] // m['num_spaces'] // 1024} KiB = "
            f"{m['bases_buffer_bytes'] / 1024:.0f} KiB ({m['bases_used_bytes'] / 1024:.0f} KiB in use)",
            f"{m['trainable_parameter_bytes'] / 1024:.0f} KiB",
        ])  # fmt: skip
    out.append(
        "**Peak memory** (MiB of live CPU tensors allocated during the call, torch profiler memory events; the "
        "model, data and optimizer state allocated before are not counted) and the persistent memory of PGP"
        + (
            f"; whole benchmark process max RSS {data['process_max_rss_bytes'] / 2**20:.0f} MiB"
            if "process_max_rss_bytes" in data
            else ""
        )
        + "\n\n"
        + table(
            [
                "method",
                "train step, PGP on",
                "train step, PGP off",
                "on/off",
                "memory update",
                "model forward",
                "update/forward",
                "bases (buffers)",
                "trainable params",
            ],
            rows,
        )  # fmt: skip
    )
    th = data["throughput"]
    rows = []
    for name, label in [
        ("linear_probe", "frozen backbone, no-grad forward + linear head (linear probe)"),
        ("frozen_backprop", "frozen backbone, forward + backward through all layers + linear head"),
        ("full_finetune", "full fine-tuning (all backbone weights trainable)"),
        ("l2p_pgp_off", "L2P, PGP off"),
        ("l2p_pgp_on", "L2P-PGP"),
        ("dualprompt_pgp_off", "DualPrompt, PGP off"),
        ("dualprompt_pgp_on", "DualPrompt-PGP"),
    ]:
        ratio = th["ratio_vs_frozen_backprop"].get(name)
        rows.append([
            label,
            f"{th['images_per_second'][name]:.0f}",
            f"{th['step'][name]['median_ms']:.1f}",
            "1 (reference)" if ratio is None else f"{ratio['median']:.2f}",
        ])  # fmt: skip
    out.append(
        f"**Training throughput** at batch {th['batch_size']}, {th['image_size']}×{th['image_size']} "
        "(one step = forward + backward + Adam; interleaved rounds)\n\n"
        + table(["configuration", "images/s", "step (ms, median)", "step time / frozen fwd+bwd"], rows)
    )
    return "\n\n".join(out)


def section_scaling() -> str:
    data = load("scaling.json")
    if not data:
        return "_no results yet_"
    out = []
    rows = []
    for r in data["vs_hidden_size"]:
        ratio = r["ratio_update_vs_forward"]
        rows.append([
            r["hidden_size"], r["num_heads"], METHOD_NAMES[r["method"]],
            f"{r['update']['median_ms']:.0f}", f"{r['forward']['median_ms']:.0f}", f"{ratio['median']:.2f}",
            mb(r["peak_bytes_update"]), mb(r["peak_bytes_forward"]),
            f"{r['bases_buffer_bytes'] / 1024:.0f}",
            f"{r['total_rank']} / {r['total_dim']}",
            f"{r['step']['projection_only_ms']:.2f}", f"{r['step']['step_off']['median_ms']:.0f}",
            f"{100 * r['step']['projection_share_of_step']:.2f} %",
            f"{r['step']['paired_ratio']['median']:.3f}",
        ])  # fmt: skip
    out.append(
        f"**vs hidden size D** (random-init ViT, depth 2, head dim 64, 65 tokens; "
        f"{data['vs_hidden_size'][0]['memory_samples']} memory samples in batches of 32; DualPrompt G-prompt at layer 0, E-prompt at layer 1; step at batch 8)\n\n"
        + table(
            [
                "D",
                "heads",
                "method",
                "update (ms)",
                "forward (ms)",
                "update/fwd",
                "peak update (MiB)",
                "peak fwd (MiB)",
                "bases (KiB)",
                "rank / dims",
                "projection (ms)",
                "step off (ms)",
                "projection share",
                "step on/off (paired)",
            ],
            rows,
        )  # fmt: skip
    )
    rows = []
    for r in data["vs_memory_samples"]:
        rows.append([
            r["memory_samples"], METHOD_NAMES[r["method"]],
            f"{r['update']['median_ms']:.0f}", f"{r['forward']['median_ms']:.0f}",
            f"{r['ratio_update_vs_forward']['median']:.2f}",
            mb(r["peak_bytes_update"]), mb(r["peak_bytes_forward"]),
            f"{r['total_rank']} / {r['total_dim']}",
        ])  # fmt: skip
    out.append(
        "**vs number of memory samples** (shipped tiny ViT, D = 64; Fashion-MNIST task 0; batches of 128)\n\n"
        + table(
            [
                "samples",
                "method",
                "update (ms)",
                "forward (ms)",
                "update/fwd",
                "peak update (MiB)",
                "peak fwd (MiB)",
                "rank / dims",
            ],
            rows,
        )  # fmt: skip
    )
    rows = []
    for r in data["vs_tasks"]:
        rows.append([
            r["tasks_seen"], METHOD_NAMES[r["method"]], f"{r['update_ms']:.0f}", f"{r['projection_only_ms']:.3f}",
            f"{r['total_rank']} / {r['total_dim']}", f"{100 * r['max_rank_fraction']:.0f} %",
            f"{r['bases_buffer_bytes'] / 1024:.0f}", f"{r['bases_used_bytes'] / 1024:.1f}",
        ])  # fmt: skip
    out.append(
        "**vs number of tasks** (shipped tiny ViT; ten 1-class Fashion-MNIST tasks, 256 memory samples each, "
        "memory updated after every task)\n\n"
        + table(
            [
                "tasks seen",
                "method",
                "update (ms)",
                "projection per step (ms)",
                "total rank / dims",
                "fullest space",
                "bases allocated (KiB)",
                "bases in use (KiB)",
            ],
            rows,
        )  # fmt: skip
    )
    return "\n\n".join(out)


CONFIG_LABELS = {
    "before": "before: no cache",
    "eval_query_cache": "+ eval query cache only",
    "train_query_cache": "+ training query cache only",
    "decode_cache": "+ decode cache only",
    "after": "after: all on (defaults)",
}


def section_run() -> str:
    data = load("run.json")
    if data is None:
        return "_not run yet: `python benchmarks/bench_run.py`_"
    runs = data["whole_runs"]
    protocol = data["protocol"]
    out = [
        f"**Whole 5-task runs** ({data['model']}; {data['data_source']}; {protocol['epochs']} epochs, batch "
        f"{protocol['batch_size']}, eval batch 128, {protocol['train_per_class'] * 2} training and "
        f"{protocol['test_per_class'] * 2} test images per task, PGP on; {runs['rounds']} interleaved rounds; "
        "seconds are medians over rounds; ratios are medians of the per-round ratios to `before` (min–max); CPU "
        "time is the single-threaded process's own, wall time includes waiting for the shared cores)",
        "",
    ]
    for method, entry in runs["methods"].items():
        rows = []
        for config, values in entry["configs"].items():
            cpu, cpu_ratio = values["median_cpu_seconds"], values["cpu_ratio_vs_before"]
            wall_ratio = values["ratio_vs_before"]

            def r(ratios, phase):
                item = ratios.get(phase)
                return "–" if item is None else f"{item['median']:.2f} ({item['min']:.2f}–{item['max']:.2f})"

            rows.append(
                [
                    CONFIG_LABELS.get(config, config),
                    " / ".join(f"{cpu[p]:.1f}" for p in ("train", "memory", "evaluation", "other")),
                    f"{cpu['total']:.1f}",
                    r(cpu_ratio, "train"),
                    r(cpu_ratio, "memory"),
                    r(cpu_ratio, "evaluation"),
                    r(cpu_ratio, "total"),
                    f"{values['median_seconds']['total']:.1f}",
                    r(wall_ratio, "evaluation"),
                    r(wall_ratio, "total"),
                    "✅ equal" if values["accuracy_matrix_equal_to_before"] else "❌ differs",
                    f"{values['query_cache_bytes'] / 1024:.0f} / {values['decoded_image_bytes'] / 1024:.0f}",
                ]
            )
        out += [
            f"*{METHOD_NAMES[method]}*",
            "",
            table(
                [
                    "configuration",
                    "CPU s: train / memory / eval / other",
                    "CPU s total",
                    "CPU ratio train",
                    "CPU ratio memory",
                    "CPU ratio evaluation",
                    "CPU ratio total",
                    "wall s total",
                    "wall ratio evaluation",
                    "wall ratio total",
                    "accuracy matrices vs before",
                    "query cache / decoded images (KiB)",
                ],
                rows,
            ),
            "",
        ]
        after_cpu = entry["configs"]["after"]["cpu_ratio_vs_before"]
        after_wall = entry["configs"]["after"]["ratio_vs_before"]
        targets = runs["targets"]
        out.append(
            f"{METHOD_NAMES[method]}, all options on vs off: evaluation {after_cpu['evaluation']['median']:.2f}× "
            f"CPU time ({after_wall['evaluation']['median']:.2f}× wall), target ≤ {targets['evaluation']}: "
            f"{met(after_cpu['evaluation']['median'], targets['evaluation'])}; whole run "
            f"{after_cpu['total']['median']:.2f}× CPU time ({after_wall['total']['median']:.2f}× wall), target ≤ "
            f"{targets['total']}: {met(after_cpu['total']['median'], targets['total'])}."
        )
        out.append("")
    out += baseline_comparison(runs["targets"])
    step = data["step"]
    rows = []
    for method in ("l2p", "dualprompt"):
        before = step["step_ms"][f"{method}_before"]["median_ms"]
        after = step["step_ms"][f"{method}_after"]["median_ms"]
        rows.append(
            [
                METHOD_NAMES[method],
                f"{before:.1f}",
                f"{after:.1f}",
                f"{step['after_vs_before'][method]['median']:.2f}",
                f"{step['ratio_vs_frozen_backprop'][f'{method}_before']['median']:.2f}",
                f"{step['ratio_vs_frozen_backprop'][f'{method}_after']['median']:.2f}",
            ]
        )
    out += [
        f"**Training step vs a frozen forward+backward** (batch {step['batch_size']}, forward + backward + clip + "
        f"project + Adam; frozen fwd+bwd: {step['step_ms']['frozen_backprop']['median_ms']:.1f} ms; interleaved, "
        "medians of per-round ratios). Before: the step runs the frozen query pass; after: the query comes "
        "from the cache (every epoch after the first without augmentation).",
        "",
        table(
            [
                "method",
                "step before (ms)",
                "step after (ms)",
                "after / before",
                "before / frozen fwd+bwd",
                "after / frozen fwd+bwd",
            ],
            rows,
        ),
    ]
    loader = data["loader"]
    rates = loader["images_per_second"]
    out += [
        "",
        f"**Data path** (training DataLoader alone, batch {loader['batch_size']}, decode + reference transform + "
        f"collate, main process): decoding every time {rates['decode_every_time']:.0f} images/s; with the "
        f"decode cache {rates['decode_cache_first_pass']:.0f} images/s in the first pass and "
        f"{rates['decode_cache_warm']:.0f} images/s afterwards "
        f"({loader['decoded_bytes'] / 1024:.0f} KiB of decoded pixels); the L2P training step itself runs "
        f"at {loader['step_images_per_second']:.0f} images/s.",
    ]
    share = data["embeddings"]
    out += [
        "",
        f"**Shared patch embeddings?** The embeddings (patch projection + position) take "
        f"{share['embeddings_ms']['median_ms']:.2f} ms of a {share['query_pass_ms']['median_ms']:.1f} ms query "
        f"pass ({100 * share['share_of_query_pass']['median']:.1f} %): not worth sharing.",
    ]
    compiled = data.get("compile")
    if compiled:
        out += [
            "",
            f"**torch.compile** (L2P step with cached query, batch {compiled['batch_size']}): first compiled step "
            "(inductor cache as left by earlier runs) "
            f"{compiled['first_compiled_step_seconds']:.0f} s; steady state compiled / eager "
            f"{compiled['compiled_vs_eager']['median']:.2f} "
            f"({compiled['compiled_vs_eager']['p25']:.2f}–{compiled['compiled_vs_eager']['p75']:.2f}); "
            f"max |logit difference| {compiled['max_abs_logit_difference']:.1e}.",
        ]
    whole = data.get("compile_whole_runs")
    if whole:
        eager, compiled_runs = whole["cpu_seconds"]["eager"], whole["cpu_seconds"]["compiled"]
        out[-1] += (
            " Whole L2P runs (all caches on), CPU seconds eager vs compiled: "
            f"{eager[0]['total']:.1f} vs {compiled_runs[0]['total']:.1f} with a cold inductor cache, "
            f"{eager[1]['total']:.1f} vs {compiled_runs[1]['total']:.1f} with a warm one; accuracy matrices "
            + ("equal." if whole["accuracy_matrix_equal"] else "different.")
        )
    return "\n".join(out)


def baseline_comparison(targets: dict[str, float]) -> list[str]:
    """Lines for results/run_baseline.json (`bench_baseline.py`: current defaults vs an older checkout)."""
    data = load("run_baseline.json")
    if data is None:
        return []
    rows = []
    for method, phases in data["summary"].items():
        rows.append(
            [METHOD_NAMES[method]]
            + [
                f"{phases[p]['old_median_seconds']:.1f} → {phases[p]['current_median_seconds']:.1f}: "
                f"{phases[p]['ratio']['median']:.2f} ({phases[p]['ratio']['min']:.2f}–{phases[p]['ratio']['max']:.2f})"
                for p in ("train", "memory", "evaluation", "other", "total")
            ]
            + [
                f"evaluation {met(phases['evaluation']['ratio']['median'], targets['evaluation'])}, "
                f"total {met(phases['total']['ratio']['median'], targets['total'])}"
            ]
        )
    commits = data["commits"]
    return [
        f"**Against the code before the speed work** (`bench_baseline.py`: commit {commits['old'][:7]}, the "
        f"parent of the first speed commit, vs the current code {commits['current'][:7]} with its defaults; "
        f"same protocol, {data['rounds']} interleaved rounds, one process per run after a warm-up run, phases "
        "timed from outside in both; CPU seconds old → current, medians, and the median per-round ratio "
        "(min–max))",
        "",
        table(
            [
                "method",
                "train",
                "memory",
                "evaluation",
                "other",
                "total",
                "targets (eval ≤ 0.6, total ≤ 0.75)",
            ],
            rows,
        ),
        "",
    ]


def section_lora() -> str:
    data = load("lora.json")
    if not data:
        return "_no results yet: run `python benchmarks/bench_lora.py`_"
    runs = data["runs"]
    prompt_runs = [
        r
        for r in (load("forgetting_fashion_mnist.json") or {}).get("runs", [])
        if r["backbone"] == "pretrained"
    ]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    baseline = {r["seed"]: r for r in runs if r["variant"] == "lora"}

    def layer_ratio(run):
        """Per adapted layer: this run's old-input drift / the no-projection run's (same seed)."""
        base = baseline.get(run["seed"])
        if base is None:
            return []
        return [run["layer_drift"][path] / base["layer_drift"][path] for path in run["layer_drift"]]

    header = [
        "method", "avg acc ↑", "forgetting (paper) ↓", "forgetting (ref.) ↓", "task-0 logit drift ↓",
        "task-0 feature drift ↓", "old-input drift per layer: max ↓", "per-layer drift / no projection: max",
        "new-task acc", "trainable params",
    ]  # fmt: skip
    rows = []
    for method in ("l2p", "dualprompt"):
        for use_pgp in (False, True):
            group = [r for r in prompt_runs if (r["method"], r["use_pgp"]) == (method, use_pgp)]
            if not group:
                continue
            rows.append([
                METHOD_NAMES[method] + ("-PGP" if use_pgp else ""),
                mean_std([r["average_accuracy"] for r in group]),
                mean_std([r["forgetting_paper"] for r in group]),
                mean_std([r["forgetting_reference"] for r in group]),
                mean_std([r["task0_logit_drift"] for r in group], 3),
                mean_std([r["task0_feature_drift"] for r in group], 3),
                "–", "–",
                mean_std([r["new_task_accuracy"] for r in group]),
                f"{data['prompt_trainable_parameters'][method]:,}",
            ])  # fmt: skip
    for variant in variants:
        group = [r for r in runs if r["variant"] == variant]
        ratios = [max(layer_ratio(r)) for r in group if layer_ratio(r)]
        rows.append([
            "LoRA (sequential)" if variant == "lora" else f"**LoRA-PGP** {variant.removeprefix('lora-pgp ')}",
            mean_std([r["average_accuracy"] for r in group]),
            mean_std([r["forgetting_paper"] for r in group]),
            mean_std([r["forgetting_reference"] for r in group]),
            mean_std([r["task0_logit_drift"] for r in group], 3),
            mean_std([r["task0_feature_drift"] for r in group], 3),
            mean_std([max(r["layer_drift"].values()) for r in group], 3),
            "–" if variant == "lora" else mean_std(ratios, 2),
            mean_std([r["new_task_accuracy"] for r in group]),
            f"{group[0]['trainable_parameters']:,}",
        ])  # fmt: skip
    lora = data["lora"]
    lines = [
        f"Fashion-MNIST, the §1 protocol, shipped pretrained backbone, seeds {data['seeds']}; mean ± std. "
        f"LoRA: r = {lora['r']}, lora_alpha = {lora['lora_alpha']:g}, targets {', '.join(lora['target_modules'])} "
        "of all 6 blocks (InfLoRA's rank and targets), created by peft. L2P / DualPrompt rows: "
        f"{data['prompt_methods_from']}. `+update`: `project_update=True` (the parameter change is projected "
        "after every Adam step); `B x`: `lora_b_threshold = x` for the B spaces (the A spaces keep eps). Old-input drift of an adapted layer = ‖Δ(s·B·A)x‖ / ‖W₀x + b + s·B·A·x‖ over "
        "the task-0 test images' inputs x to that layer recorded after task 0 (change from after task 0 to "
        "the end); the ratio column is the largest per-layer ratio to the sequential-LoRA run of the same seed.",
        "",
        table(header, rows, "l" + "r" * (len(header) - 1)),
    ]
    # forgetting verdict, paired by seed, against sequential LoRA
    verdict_rows = []
    for variant in variants:
        if variant == "lora":
            continue
        pairs = [
            (r["forgetting_paper"], baseline[r["seed"]]["forgetting_paper"])
            for r in runs
            if r["variant"] == variant and r["seed"] in baseline
        ]
        diffs = np.asarray([a - b for a, b in pairs])
        spread = float(np.std([b for _, b in pairs], ddof=1)) if len(pairs) > 1 else float("nan")
        std = float(diffs.std(ddof=1)) if diffs.size > 1 else float("nan")
        all_ratios = [x for r in runs if r["variant"] == variant for x in layer_ratio(r)]
        verdict_rows.append([
            variant.removeprefix("lora-pgp "),
            f"{diffs.mean():+.1f} ± {std:.1f}",
            f"{spread:.1f}",
            "yes" if diffs.size > 1 and -diffs.mean() > 2 * max(std, spread) else "no",
            f"{np.max(all_ratios):.2f}" if all_ratios else "–",
            "yes" if all_ratios and np.max(all_ratios) < 0.5 else "no",
        ])  # fmt: skip
    lines += [
        "",
        "Done-when check. Forgetting lowered beyond seed spread: the mean paired difference exceeds twice both "
        "its own std and the std of sequential LoRA's forgetting over seeds. Drift: the largest per-layer "
        "drift ratio over every adapted layer and seed.",
        "",
        table(
            [
                "LoRA-PGP variant",
                "Δ forgetting vs LoRA (paper)",
                "LoRA forgetting seed std",
                "lower beyond seed spread",
                "max per-layer drift ratio",
                "every layer < 0.5×",
            ],
            verdict_rows,
        ),  # fmt: skip
    ]
    # protected dimensions per layer after every task (seed 0), for the update-projected variants
    shown = ("lora-pgp eps=0.99 +update", "lora-pgp eps=0.999 +update", "lora-pgp eps=0.999 B 0.97 +update")
    for variant in variants:
        if variant not in shown:
            continue
        run = next(r for r in runs if r["variant"] == variant)
        dims = run["memory_dims"]
        paths = sorted({name.rsplit(".", 1)[0] for name in dims}, key=lambda p: (int(p.split(".")[1]), p))
        header = ["adapted layer"] + [f"after task {t + 1}" for t in range(len(run["memory_ranks_per_task"]))]
        body = []
        for path in paths:
            cells = []
            for ranks in run["memory_ranks_per_task"]:
                cells.append(
                    f"{ranks[path + '.lora_A']}/{dims[path + '.lora_A']} · {ranks[path + '.lora_B']}/{dims[path + '.lora_B']}"
                )
            body.append([f"`{path}`"] + cells)
        lines += [
            "",
            f"Protected dimensions, {variant} (seed {run['seed']}): `A space (inputs x) · B space (z = A x)`, "
            "rank / dimension.",
            "",
            table(header, body, "l" + "r" * (len(header) - 1)),
        ]
    # cost
    cost_rows = []
    for variant in variants:
        group = [r for r in runs if r["variant"] == variant]
        steps = [r["step_ms_median"] for r in group]
        plain = [s["plain"] for s in steps if s["plain"]]
        projected = [s["projected"] for s in steps if s["projected"]]
        updates = [u for r in group for u in r["memory_update_vs_forward_seconds"]]
        cost_rows.append([
            variant,
            mean_std(plain, 0),
            mean_std(projected, 0) if projected else "–",
            mean_std([u / f for u, f in updates], 2) if updates else "–",
        ])  # fmt: skip
    lines += [
        "",
        "Cost, measured inside the runs above (not interleaved; the cores were shared with other jobs, so "
        "take differences of a few % as noise): median optimizer-step time on tasks without bases (task 1, and "
        "every task without PGP) and with bases (tasks 2-5); memory update (rows, Gram matrices, bases) over "
        "the 256 memory samples divided by a plain adapted forward over the same samples.",
        "",
        table(["variant", "step ms, no bases", "step ms, projected", "memory update / forward"], cost_rows),
    ]
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED:{name} -->\n).*?(\n<!-- END GENERATED:{name} -->)", flags=re.DOTALL
    )
    if not pattern.search(text):
        raise SystemExit(f"README.md has no block {name!r}")
    return pattern.sub(lambda m: m.group(1) + body.strip() + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-seconds", type=float)
    parser.add_argument("--stages", type=Path, help="tab-separated 'stage<TAB>seconds' lines from run_all.sh")
    parser.add_argument("--cpu-times", type=Path, help="the output of bash `times` at the end of run_all.sh")
    args = parser.parse_args()
    cpu_seconds = None
    if args.cpu_times and args.cpu_times.exists():
        lines = args.cpu_times.read_text().split("\n")
        if len(lines) > 1:
            parts = re.findall(r"(\d+)m([\d.]+)s", lines[1])
            cpu_seconds = sum(60 * int(m) + float(sec) for m, sec in parts)
    stages = None
    if args.stages and args.stages.exists():
        stages = {}
        for line in args.stages.read_text().splitlines():
            if line.strip():
                name, seconds = line.split("\t")
                stages[name] = float(seconds)
    if args.total_seconds is not None:
        from pgp_peft.metrics import write_results_json

        write_results_json(
            RESULTS / "run_all.json",
            {
                "total_seconds": args.total_seconds,
                "cpu_seconds_children": cpu_seconds,
                "stages": stages or {},
                "environment": _environment(),
            },
        )
    readme = README
    if not readme.exists():
        readme.parent.mkdir(parents=True, exist_ok=True)
        readme.write_text((HERE / "README.md").read_text())
    text = readme.read_text(encoding="utf-8")
    blocks = {
        "environment": section_environment(args.total_seconds, stages),
        "protocol": section_protocol(),
        "forgetting": section_forgetting(),
        "verdict": section_verdict(),
        "head_init_change": section_head_init_change(),
        "thresholds": section_thresholds(),
        "cost": section_cost(),
        "scaling": section_scaling(),
        "run": section_run(),
        "lora": section_lora(),
    }
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme}")


def _environment():
    import sys

    sys.path.insert(0, str(HERE))
    import common

    return common.environment()


if __name__ == "__main__":
    main()
