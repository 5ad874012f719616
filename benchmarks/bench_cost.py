"""What PGP costs, as ratios measured within one run (interleaved repetitions, medians).

1. Training step time with projection on vs off: the same model, after a real memory update (bases
   non-empty), the Trainer's order (forward, backward, clip, project, Adam step). Target <= 1.03.
2. Task-boundary memory update (`pgp_peft.memory.update_memory`) vs a plain no-grad forward pass
   over the same memory samples. Target <= 1.5.
3. Peak memory (live CPU tensor bytes, torch profiler) of the above, and the size of the bases.
4. Images/s of the prompted training step vs the plain frozen backbone at the same size.

Model: the shipped CIFAR-10-pretrained tiny ViT; data: Fashion-MNIST tasks 0 and 1.

    python benchmarks/bench_cost.py          # -> results/cost.json
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable

import common
import numpy as np
import torch

BATCH = 32
MEMORY_SAMPLES = 256
MEMORY_BATCH = 128  # = the eval batch size of the forgetting runs (the Trainer streams memory with it)
TARGET_STEP = 1.03
TARGET_MEMORY = 1.5


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, per_round: int, seed: int = 0, warmup: int = 1
):
    """Time every fn `per_round` times per round, fns in a fresh random order each round.

    Returns {name: [seconds, ...]} and the per-round medians {name: [median of that round, ...]}."""
    rng = random.Random(seed)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds_out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            samples = []
            for _ in range(per_round):
                start = time.perf_counter()
                fns[name]()
                samples.append(time.perf_counter() - start)
            times[name].extend(samples)
            rounds_out[name].append(float(np.median(samples)))
    return times, rounds_out


def summary(times: list[float]) -> dict[str, float]:
    array = np.asarray(times)
    return {
        "median_ms": float(np.median(array) * 1e3),
        "p25_ms": float(np.percentile(array, 25) * 1e3),
        "p75_ms": float(np.percentile(array, 75) * 1e3),
        "n": int(array.size),
    }


def paired_ratio(rounds: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Median and IQR over rounds of (round median of a) / (round median of b)."""
    ratios = np.asarray(rounds[a]) / np.asarray(rounds[b])
    return {
        "median": float(np.median(ratios)),
        "p25": float(np.percentile(ratios, 25)),
        "p75": float(np.percentile(ratios, 75)),
    }


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def prepared_model(method: str, backbone_model, splits, memory_samples: int = MEMORY_SAMPLES, **overrides):
    """A PGP model after task 0's memory update (bases non-empty), set up to train task 1."""
    from pgp_peft import get_pgp_model
    from pgp_peft.data import memory_subset
    from pgp_peft.memory import update_memory

    torch.manual_seed(0)
    config = common.make_config(method, True, memory_samples=memory_samples, **overrides)
    model = get_pgp_model(copy.deepcopy(backbone_model), config)
    empty_memory = {k: v.clone() for k, v in model.memory.state_dict().items()}
    memory_pixels = common.eval_pixels(memory_subset(splits.train[0], memory_samples, seed=0))
    batches = list(memory_pixels.split(MEMORY_BATCH))
    model.register_task_classes(0, splits.task_classes[0])
    update_memory(model, batches, 0)
    after_task0 = {k: v.clone() for k, v in model.memory.state_dict().items()}
    model.register_task_classes(1, splits.task_classes[1])
    model.begin_task(1)
    model.train()
    return model, batches, empty_memory, after_task0


def train_step_fn(model, pixels, labels, task_id: int = 1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=common.PROTOCOL["learning_rate"], weight_decay=0.0)

    def step(use_pgp: bool) -> None:
        model.config.use_pgp = use_pgp
        out = model(pixels, labels=labels, task_id=task_id)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        model.project_gradients_()  # what ProjectionCallback.on_pre_optimizer_step calls
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def projection_only_ms(model, pixels, labels, repeats: int = 200) -> float:
    """Median time of `project_gradients_()` alone, with real gradients present (projection is
    idempotent, so repeating it on the same gradients measures the same work)."""
    model.config.use_pgp = True
    model.zero_grad(set_to_none=True)
    model(pixels, labels=labels, task_id=1).loss.backward()
    for _ in range(10):
        model.project_gradients_()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.project_gradients_()
        samples.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return float(np.median(samples) * 1e3)


# ----------------------------------------------------------------------------- 1. step on / off
def step_overhead(method: str, backbone_model, splits, rounds: int) -> dict:
    model, _, _, _ = prepared_model(method, backbone_model, splits)
    train = common.eval_pixels(splits.train[1].select(range(BATCH)))
    labels = torch.as_tensor(splits.train[1].select(range(BATCH))["labels"])
    step = train_step_fn(model, train, labels)
    times, per_round = interleaved(
        {"pgp_on": lambda: step(True), "pgp_off": lambda: step(False)}, rounds=rounds, per_round=3, warmup=3
    )
    on, off = summary(times["pgp_on"]), summary(times["pgp_off"])
    projection_ms = projection_only_ms(model, train, labels)
    model.config.use_pgp = True
    return {
        "method": method,
        "batch_size": BATCH,
        "memory_ranks": model.memory.ranks(),
        "step_pgp_on": on,
        "step_pgp_off": off,
        "ratio_of_medians": on["median_ms"] / off["median_ms"],
        "paired_round_ratio": paired_ratio(per_round, "pgp_on", "pgp_off"),
        "projection_only_ms": projection_ms,
        "projection_share_of_step": projection_ms / off["median_ms"],
        "target": TARGET_STEP,
    }


# ----------------------------------------------------------------------------- 2. memory update
def memory_cost(method: str, backbone_model, splits, rounds: int) -> dict:
    from pgp_peft.data import memory_subset, with_image_transform
    from pgp_peft.memory import update_memory

    model, batches, empty_memory, after_task0 = prepared_model(method, backbone_model, splits)
    later_pixels = common.eval_pixels(memory_subset(splits.train[1], MEMORY_SAMPLES, seed=1))
    later_batches = list(later_pixels.split(MEMORY_BATCH))

    def first_update():
        model.memory.load_state_dict(empty_memory)
        update_memory(model, batches, 0)

    def later_update():
        model.memory.load_state_dict(after_task0)
        update_memory(model, later_batches, 1)

    @torch.no_grad()
    def model_forward():
        model.eval()
        for batch in batches:
            model(batch)
        model.train()

    @torch.no_grad()
    def backbone_forward():
        for batch in batches:
            model.backbone(batch)

    times, per_round = interleaved(
        {
            "update_first_task": first_update,
            "update_later_task": later_update,
            "model_forward": model_forward,
            "backbone_forward": backbone_forward,
        },
        rounds=rounds,
        per_round=1,
        warmup=1,
    )
    # end to end, as the Trainer does it: decode + transform the memory subset in a DataLoader
    from torch.utils.data import DataLoader

    from pgp_peft.data import collate

    _, eval_tf = common.transforms()
    subset = with_image_transform(memory_subset(splits.train[0], MEMORY_SAMPLES, seed=0), eval_tf, "image")
    loader = DataLoader(subset, batch_size=MEMORY_BATCH, shuffle=False, collate_fn=collate)

    def e2e_update():
        model.memory.load_state_dict(empty_memory)
        update_memory(model, loader, 0)

    @torch.no_grad()
    def e2e_forward():
        model.eval()
        for batch in loader:
            model(batch["pixel_values"])
        model.train()

    e2e_times, e2e_rounds = interleaved(
        {"update_with_decoding": e2e_update, "forward_with_decoding": e2e_forward},
        rounds=max(3, rounds // 2),
        per_round=1,
    )
    peaks = {
        "update_first_task": common.peak_cpu_bytes(first_update),
        "model_forward": common.peak_cpu_bytes(model_forward),
        "backbone_forward": common.peak_cpu_bytes(backbone_forward),
    }
    model.memory.load_state_dict(after_task0)
    out = {
        "method": method,
        "memory_samples": MEMORY_SAMPLES,
        "batch_size": MEMORY_BATCH,
        "times": {name: summary(values) for name, values in {**times, **e2e_times}.items()},
        "ratio_update_vs_model_forward": paired_ratio(per_round, "update_first_task", "model_forward"),
        "ratio_later_update_vs_model_forward": paired_ratio(per_round, "update_later_task", "model_forward"),
        "ratio_update_vs_backbone_forward": paired_ratio(per_round, "update_first_task", "backbone_forward"),
        "ratio_update_vs_forward_with_decoding": paired_ratio(
            e2e_rounds, "update_with_decoding", "forward_with_decoding"
        ),
        "peak_bytes": peaks,
        "peak_ratio_update_vs_model_forward": peaks["update_first_task"] / max(peaks["model_forward"], 1),
        "bases_buffer_bytes": tensor_bytes(model.memory.buffers()),
        "bases_used_bytes": int(sum(model.memory.basis(n).numel() * 4 for n in model.memory.names)),
        "num_spaces": len(model.memory.names),
        "trainable_parameter_bytes": tensor_bytes(p for p in model.parameters() if p.requires_grad),
        "target": TARGET_MEMORY,
    }
    return out


# ----------------------------------------------------------------------------- 3. peak memory of a step
def step_peaks(method: str, backbone_model, splits) -> dict:
    model, _, _, _ = prepared_model(method, backbone_model, splits)
    train = common.eval_pixels(splits.train[1].select(range(BATCH)))
    labels = torch.as_tensor(splits.train[1].select(range(BATCH))["labels"])
    step = train_step_fn(model, train, labels)
    step(True)
    step(False)  # optimizer state exists before measuring
    on = common.peak_cpu_bytes(lambda: step(True))
    off = common.peak_cpu_bytes(lambda: step(False))
    return {"method": method, "peak_bytes_pgp_on": on, "peak_bytes_pgp_off": off, "ratio": on / max(off, 1)}


# ----------------------------------------------------------------------------- 4. throughput
def throughput(backbone_model, splits, rounds: int) -> dict:
    """Images/s of one training step (forward + backward + Adam) at batch 32, 32x32 inputs."""
    pixels = common.eval_pixels(splits.train[1].select(range(BATCH)))
    labels = torch.as_tensor(splits.train[1].select(range(BATCH))["labels"])
    fns: dict[str, Callable[[], None]] = {}
    for method in ("l2p", "dualprompt"):
        model, _, _, _ = prepared_model(method, backbone_model, splits)
        step = train_step_fn(model, pixels, labels)
        fns[f"{method}_pgp_on"] = lambda step=step: step(True)
        fns[f"{method}_pgp_off"] = lambda step=step: step(False)

    hidden = backbone_model.config.hidden_size
    frozen = copy.deepcopy(backbone_model).eval().requires_grad_(False)
    probe_head = torch.nn.Linear(hidden, 10)
    probe_opt = torch.optim.AdamW(probe_head.parameters(), lr=0.01, weight_decay=0.0)

    def linear_probe():  # frozen forward without autograd, train the head only
        with torch.no_grad():
            cls = frozen(pixel_values=pixels).last_hidden_state[:, 0]
        torch.nn.functional.cross_entropy(probe_head(cls), labels).backward()
        probe_opt.step()
        probe_opt.zero_grad(set_to_none=True)

    def frozen_backprop():  # frozen weights, backward through every layer (what input prompts need)
        inputs = pixels.clone().requires_grad_(True)
        cls = frozen(pixel_values=inputs).last_hidden_state[:, 0]
        torch.nn.functional.cross_entropy(probe_head(cls), labels).backward()
        probe_opt.step()
        probe_opt.zero_grad(set_to_none=True)

    tuned = copy.deepcopy(backbone_model).train().requires_grad_(True)
    tune_head = torch.nn.Linear(hidden, 10)
    tune_params = [*tuned.parameters(), *tune_head.parameters()]
    tune_opt = torch.optim.AdamW(tune_params, lr=1e-4, weight_decay=0.0)

    def finetune():
        cls = tuned(pixel_values=pixels).last_hidden_state[:, 0]
        torch.nn.functional.cross_entropy(tune_head(cls), labels).backward()
        torch.nn.utils.clip_grad_norm_(tune_params, 1.0)
        tune_opt.step()
        tune_opt.zero_grad(set_to_none=True)

    fns.update(linear_probe=linear_probe, frozen_backprop=frozen_backprop, full_finetune=finetune)
    times, per_round = interleaved(fns, rounds=rounds, per_round=2, warmup=2)
    out = {"batch_size": BATCH, "image_size": 32, "images_per_second": {}, "step": {}}
    for name, values in times.items():
        out["step"][name] = summary(values)
        out["images_per_second"][name] = BATCH / float(np.median(values))
    out["ratio_vs_frozen_backprop"] = {
        name: paired_ratio(per_round, name, "frozen_backprop") for name in fns if name != "frozen_backprop"
    }
    out["references"] = {
        "linear_probe": "frozen backbone forward under no_grad + linear head on CLS (fwd+bwd+Adam of the head)",
        "frozen_backprop": "frozen backbone forward+backward through all layers (weights frozen, gradient "
        "flows to the input) + linear head: the plain frozen backbone at the same size",
        "full_finetune": "every backbone weight trainable: forward+backward+Adam",
        "l2p_pgp_on": "L2P training step incl. frozen query pass, projection on (bases after task 0)",
        "dualprompt_pgp_on": "DualPrompt training step incl. frozen query pass, projection on",
    }
    return out


def main() -> None:
    threads = common.set_threads()
    started = time.perf_counter()
    rounds = 4 if common.QUICK else 30
    splits, source = common.make_splits("fashion_mnist", 200 if not common.QUICK else 20, 10, seed=0)
    backbone_model = common.shipped_backbone()
    result: dict = {
        "benchmark": "cost",
        "model": common.BACKBONE_LABELS["pretrained"],
        "data_source": source,
        "torch_threads": threads,
        "step": [],
        "memory_update": [],
        "step_peak_memory": [],
    }
    for method in ("l2p", "dualprompt"):
        common.log(f"cost: step overhead {method}")
        result["step"].append(step_overhead(method, backbone_model, splits, rounds))
        common.log(f"cost: memory update {method}")
        result["memory_update"].append(memory_cost(method, backbone_model, splits, max(3, rounds // 3)))
        result["step_peak_memory"].append(step_peaks(method, backbone_model, splits))
    common.log("cost: throughput")
    result["throughput"] = throughput(backbone_model, splits, max(3, rounds // 3))
    try:
        import resource

        result["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        pass
    result["environment"] = common.environment()
    result["seconds"] = time.perf_counter() - started
    common.write_json("cost.json", result)


if __name__ == "__main__":
    main()
