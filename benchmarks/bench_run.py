"""Where the time of a whole continual run goes, and what the speed options of `ContinualTrainer` save.

1. Whole 5-task runs on the benchmark protocol (`common.PROTOCOL`: Fashion-MNIST, shipped tiny ViT,
   2 epochs, batch 32, eval batch 128, PGP on), wall time split by phase (train, memory update,
   evaluation of every seen task; the rest of the run is checkpoints and plots), under each speed
   option alone and all of them together vs none ("before"). Configurations alternate in rounds (a
   fresh random order per round, same seed everywhere), and each ratio is the median over rounds of
   the round's config/before ratio: a slow spell from other jobs on the shared cores hits both sides
   of a round. Wall time and the process's CPU time are both recorded (single-threaded, so CPU time
   is close to what the run takes on an idle core, and far less disturbed by other jobs). The
   accuracy matrices of all configurations are compared for equality.
2. A training step (forward + backward + Adam, batch 32, bases after task 0) with the frozen query
   computed in the step (before) and served by the query cache (after), each vs a frozen
   forward+backward of the plain backbone (the floor a prompt method cannot beat).
3. The data path alone: images/s of the training DataLoader (decode + transform + collate) without
   and with the decode cache, against the images/s of the training step.
4. Why the patch embeddings are not shared between the query and the prompted pass: their share of
   a query pass.
5. `torch.compile` of the backbone (`PGPModel.compile_backbone`): compile time and the steady-state
   step ratio compiled / eager (L2P, query served from the cache).

    python benchmarks/bench_run.py          # -> results/run.json
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from typing import Any

import bench_cost
import common
import numpy as np
import torch

METHODS = ("l2p", "dualprompt")
OFF = {"eval_query_cache": False, "train_query_cache": False, "decode_cache": False}
CONFIGS: dict[str, dict[str, Any]] = {
    "before": OFF,
    "eval_query_cache": {**OFF, "eval_query_cache": True},
    "train_query_cache": {**OFF, "train_query_cache": True},
    "decode_cache": {**OFF, "decode_cache": True},
    "after": {},  # the defaults: every option on
}
PHASES = ("train", "memory", "evaluation", "other", "total")
TARGETS = {"evaluation": 0.6, "total": 0.75}


def whole_run(splits, backbone_model, method: str, options: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """One 5-task run with `ContinualTrainer(**options)`; seconds per phase, accuracy matrix, cache sizes."""
    from transformers.trainer_callback import PrinterCallback

    from pgp_peft import ContinualTrainer, get_pgp_model

    protocol = common.PROTOCOL
    torch.manual_seed(seed)
    model = get_pgp_model(copy.deepcopy(backbone_model), common.make_config(method, True))
    train_tf, eval_tf = common.transforms()
    with tempfile.TemporaryDirectory(prefix="pgp_bench_run_") as tmp:
        args = common.training_arguments(
            tmp,
            batch_size=protocol["batch_size"],
            epochs=protocol["epochs"],
            lr=protocol["learning_rate"],
            seed=seed,
        )
        trainer = ContinualTrainer(
            model, args, splits=splits, train_transform=train_tf, eval_transform=eval_tf, **options
        )
        trainer.remove_callback(PrinterCallback)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = trainer.train_continual()
        total, cpu_total = time.perf_counter() - started, time.process_time() - cpu_started
    seconds = {phase: result.seconds.get(phase, 0.0) for phase in ("train", "memory", "evaluation")}
    seconds["other"] = total - sum(seconds.values())  # checkpoints, results.json, plots, bookkeeping
    seconds["total"] = total
    cpu_seconds = {phase: result.cpu_seconds.get(phase, 0.0) for phase in ("train", "memory", "evaluation")}
    cpu_seconds["other"] = cpu_total - sum(cpu_seconds.values())
    cpu_seconds["total"] = cpu_total
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "accuracy_matrix": result.accuracy.values.tolist(),
        "task_il_accuracy_matrix": result.task_il_accuracy.values.tolist(),
        "query_cache_bytes": trainer.query_cache.nbytes,
        "query_cache_hits": trainer.query_cache.hits,
        "query_cache_computed": trainer.query_cache.misses,
        "decoded_image_bytes": sum(cache.nbytes for cache in trainer._decoded.values()),
    }


def same_matrix(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True))


def whole_runs(splits, backbone_model, rounds: int) -> dict[str, Any]:
    rng = random.Random(0)
    runs: dict[str, dict[str, list[dict]]] = {m: {c: [] for c in CONFIGS} for m in METHODS}
    for round_index in range(rounds):
        order = [(m, c) for m in METHODS for c in CONFIGS]
        rng.shuffle(order)
        for method, config in order:
            common.log(f"run: round {round_index + 1}/{rounds} {method} {config}")
            runs[method][config].append(whole_run(splits, backbone_model, method, CONFIGS[config]))
    out: dict[str, Any] = {}
    for method in METHODS:
        before = runs[method]["before"]
        entry: dict[str, Any] = {"configs": {}}
        for config, config_runs in runs[method].items():
            values: dict[str, Any] = {"options": CONFIGS[config]}
            for clock, key in (("seconds", "ratio_vs_before"), ("cpu_seconds", "cpu_ratio_vs_before")):
                ratios = {
                    phase: [
                        run[clock][phase] / base[clock][phase]
                        for run, base in zip(config_runs, before)
                        if base[clock][phase] > 0
                    ]
                    for phase in PHASES
                }
                values[f"median_{clock}"] = {
                    p: float(np.median([r[clock][p] for r in config_runs])) for p in PHASES
                }
                values[key] = {
                    p: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                    for p, v in ratios.items()
                    if v
                }
            entry["configs"][config] = {
                **values,
                "accuracy_matrix_equal_to_before": all(
                    same_matrix(run["accuracy_matrix"], base["accuracy_matrix"])
                    and same_matrix(run["task_il_accuracy_matrix"], base["task_il_accuracy_matrix"])
                    for run, base in zip(config_runs, before)
                ),
                "query_cache_bytes": config_runs[-1]["query_cache_bytes"],
                "query_cache_hits": config_runs[-1]["query_cache_hits"],
                "query_cache_computed": config_runs[-1]["query_cache_computed"],
                "decoded_image_bytes": config_runs[-1]["decoded_image_bytes"],
            }
        entry["accuracy_matrix"] = before[0]["accuracy_matrix"]
        out[method] = entry
    return {"rounds": rounds, "methods": out, "targets": TARGETS}


# ----------------------------------------------------------------------------- 2. step ratios
def step_ratios(splits, backbone_model, rounds: int) -> dict[str, Any]:
    pixels = common.eval_pixels(splits.train[1].select(range(bench_cost.BATCH)))
    labels = torch.as_tensor(splits.train[1].select(range(bench_cost.BATCH))["labels"])
    fns = {}
    for method in METHODS:
        model, _, _, _ = bench_cost.prepared_model(method, backbone_model, splits)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=common.PROTOCOL["learning_rate"], weight_decay=0.0)
        query = model.backbone.query(pixels)

        def step(cached: bool, model=model, params=params, optimizer=optimizer, query=query) -> None:
            out = model(pixels, labels=labels, task_id=1, query=query if cached else None)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            model.project_gradients_()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        fns[f"{method}_before"] = lambda step=step: step(False)
        fns[f"{method}_after"] = lambda step=step: step(True)

    frozen = copy.deepcopy(backbone_model).eval().requires_grad_(False)
    head = torch.nn.Linear(backbone_model.config.hidden_size, 10)
    head_optimizer = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=0.0)

    def frozen_backprop() -> None:  # frozen weights, gradient through every layer to the input
        inputs = pixels.clone().requires_grad_(True)
        cls = frozen(pixel_values=inputs).last_hidden_state[:, 0]
        torch.nn.functional.cross_entropy(head(cls), labels).backward()
        head_optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)

    fns["frozen_backprop"] = frozen_backprop
    times, per_round = bench_cost.interleaved(fns, rounds=rounds, per_round=2, warmup=2)
    return {
        "batch_size": bench_cost.BATCH,
        "step_ms": {name: bench_cost.summary(values) for name, values in times.items()},
        "ratio_vs_frozen_backprop": {
            name: bench_cost.paired_ratio(per_round, name, "frozen_backprop")
            for name in fns
            if name != "frozen_backprop"
        },
        "after_vs_before": {
            method: bench_cost.paired_ratio(per_round, f"{method}_after", f"{method}_before")
            for method in METHODS
        },
    }


# ----------------------------------------------------------------------------- 3. data path
def loader_throughput(splits, step_ms: float, repeats: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from pgp_peft.data import DecodedImageCache, RowIdTransform, collate, with_image_transform

    train_tf, _ = common.transforms()
    dataset = splits.train[0]

    def images_per_second(transform, repeats: int = repeats) -> float:
        loader = DataLoader(
            with_image_transform(dataset, transform, "image"),
            batch_size=bench_cost.BATCH,
            shuffle=True,
            collate_fn=collate,
        )
        rates = []
        for _ in range(repeats):
            started, count = time.perf_counter(), 0
            for batch in loader:
                count += batch["pixel_values"].shape[0]
            rates.append(count / (time.perf_counter() - started))
        return float(np.median(rates))

    decoded = DecodedImageCache()
    first_pass = images_per_second(RowIdTransform(train_tf, "image", decoded), repeats=1)  # decodes
    return {
        "batch_size": bench_cost.BATCH,
        "images_per_second": {
            "decode_every_time": images_per_second(train_tf),
            "decode_cache_first_pass": first_pass,
            "decode_cache_warm": images_per_second(RowIdTransform(train_tf, "image", decoded)),
        },
        "decoded_bytes": decoded.nbytes,
        "step_images_per_second": bench_cost.BATCH / (step_ms / 1e3),
    }


# ----------------------------------------------------------------------------- 4. embeddings share
def embeddings_share(splits, backbone_model, rounds: int) -> dict[str, Any]:
    from pgp_peft.backbones import VisionBackbone

    backbone = VisionBackbone(copy.deepcopy(backbone_model))
    pixels = common.eval_pixels(splits.train[1].select(range(bench_cost.BATCH)))

    @torch.no_grad()
    def embeddings() -> None:
        backbone.embeddings(pixels)

    times, per_round = bench_cost.interleaved(
        {"embeddings": embeddings, "query_pass": lambda: backbone.query(pixels)}, rounds=rounds, per_round=5
    )
    return {
        "embeddings_ms": bench_cost.summary(times["embeddings"]),
        "query_pass_ms": bench_cost.summary(times["query_pass"]),
        "share_of_query_pass": bench_cost.paired_ratio(per_round, "embeddings", "query_pass"),
    }


# ----------------------------------------------------------------------------- 5. torch.compile
def compiled_step(splits, backbone_model, rounds: int) -> dict[str, Any]:
    """L2P training step with the backbone compiled (`PGPModel.compile_backbone`) vs eager, both with
    the query cache (the prompted pass is what is left): compile time, steady-state ratio, agreement."""
    pixels = common.eval_pixels(splits.train[1].select(range(bench_cost.BATCH)))
    labels = torch.as_tensor(splits.train[1].select(range(bench_cost.BATCH))["labels"])
    models = {}
    for name in ("eager", "compiled"):
        models[name], _, _, _ = bench_cost.prepared_model("l2p", backbone_model, splits)
    query = models["eager"].backbone.query(pixels)

    def step(model) -> torch.Tensor:
        out = model(pixels, labels=labels, task_id=1, query=query)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.logits.detach()

    eager_logits = step(models["eager"])
    models["compiled"].compile_backbone()
    started = time.perf_counter()
    compiled_logits = step(models["compiled"])
    compile_seconds = time.perf_counter() - started
    times, per_round = bench_cost.interleaved(
        {name: (lambda model=model: step(model)) for name, model in models.items()},
        rounds=rounds,
        per_round=2,
        warmup=2,
    )
    finite = torch.isfinite(eager_logits)
    return {
        "method": "l2p",
        "batch_size": bench_cost.BATCH,
        "first_compiled_step_seconds": compile_seconds,
        "step_ms": {name: bench_cost.summary(values) for name, values in times.items()},
        "compiled_vs_eager": bench_cost.paired_ratio(per_round, "compiled", "eager"),
        "max_abs_logit_difference": float((compiled_logits[finite] - eager_logits[finite]).abs().max()),
    }


def compiled_whole_runs(splits, backbone_model) -> dict[str, Any]:
    """Whole L2P runs (all caches on) eager vs `compile_backbone=True`, alternating, CPU seconds; the first
    compiled run starts from an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR), the second reuses it."""
    import os

    runs: dict[str, list[dict[str, float]]] = {"eager": [], "compiled": []}
    matrices_equal = True
    with tempfile.TemporaryDirectory(prefix="pgp_inductor_") as cache_dir:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            for _ in range(2):
                eager = whole_run(splits, backbone_model, "l2p", {})
                compiled = whole_run(splits, backbone_model, "l2p", {"compile_backbone": True})
                runs["eager"].append(eager["cpu_seconds"])
                runs["compiled"].append(compiled["cpu_seconds"])
                matrices_equal &= same_matrix(eager["accuracy_matrix"], compiled["accuracy_matrix"])
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return {
        "method": "l2p",
        "cpu_seconds": runs,
        "accuracy_matrix_equal": matrices_equal,
        "note": "run 1: cold inductor cache, run 2: warm",
    }


def main() -> None:
    threads = common.set_threads()
    started = time.perf_counter()
    protocol = common.PROTOCOL
    splits, source = common.make_splits(
        "fashion_mnist", protocol["train_per_class"], protocol["test_per_class"], 0
    )
    backbone_model = common.shipped_backbone()
    rounds = 1 if common.QUICK else 3
    result: dict[str, Any] = {
        "benchmark": "run",
        "model": common.BACKBONE_LABELS["pretrained"],
        "data_source": source,
        "protocol": protocol,
        "torch_threads": threads,
    }
    # the step, loader and embedding measurements use bench_cost's data (tasks of 400 images)
    cost_splits, _ = common.make_splits("fashion_mnist", 20 if common.QUICK else 200, 10, seed=0)
    common.log("run: step ratios")
    result["step"] = step_ratios(cost_splits, backbone_model, 4 if common.QUICK else 15)
    common.log("run: data path")
    step_ms = result["step"]["step_ms"]["l2p_after"]["median_ms"]
    result["loader"] = loader_throughput(cost_splits, step_ms, 2 if common.QUICK else 5)
    result["embeddings"] = embeddings_share(cost_splits, backbone_model, 4 if common.QUICK else 10)
    if not common.QUICK:  # compiling takes minutes on these cores
        common.log("run: torch.compile")
        result["compile"] = compiled_step(cost_splits, backbone_model, 10)
        result["compile_whole_runs"] = compiled_whole_runs(splits, backbone_model)
    result["whole_runs"] = whole_runs(splits, backbone_model, rounds)
    result["environment"] = common.environment()
    result["seconds"] = time.perf_counter() - started
    common.write_json("run.json", result)


if __name__ == "__main__":
    main()
