"""How the PGP memory scales: with hidden size D, with the number of memory samples, with the number of tasks.

* vs D (64 -> 768): random-init ViTs, 32x32 inputs, patch 4 (65 tokens), depth 2, head dim 64
  (1 head at D=64), MLP 4D. L2P as preset; DualPrompt with its G-prompt at layer 0 and E-prompt at
  layer 1 (depth 2). 32 memory samples. Memory-update time and peak memory vs a no-grad forward of
  the model over the same samples; the projection's share of a training step (batch 8).
* vs memory samples (32 -> 1024): the shipped tiny ViT (D=64), Fashion-MNIST task 0.
* vs number of tasks (1 -> 10): the shipped tiny ViT, ten 1-class Fashion-MNIST tasks, the memory
  updated after each task (no training in between: cost only): update time, basis ranks,
  projection time, bytes held by the bases.

    python benchmarks/bench_scaling.py        # -> results/scaling.json
"""

from __future__ import annotations

import copy
import time

import common
import numpy as np
import torch
from bench_cost import interleaved, paired_ratio, summary, tensor_bytes

HIDDEN_SIZES = [64, 128, 256, 384, 512, 768]
SAMPLE_COUNTS = [32, 64, 128, 256, 512, 1024]
NUM_TASKS = 10
BATCH = 32


def fashion_pixels(per_class: int, classes: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    """{class: (per_class, 3, 32, 32)} Fashion-MNIST training images with the eval transform."""
    from pgp_peft.data import build_transform

    x_tr, y_tr, _, _, _, _ = common.fashion_mnist_arrays(per_class, 1, seed)
    transform = build_transform(32)
    return {c: transform({"image": list(x_tr[y_tr == c])})["pixel_values"] for c in classes}


def build(method: str, backbone_model, memory_samples: int, num_classes: int = 10, **overrides):
    from pgp_peft import PromptGradientProjectionConfig as Config
    from pgp_peft import get_pgp_model

    preset = {"l2p": Config.l2p, "dualprompt": Config.dualprompt}[method]
    torch.manual_seed(0)
    config = preset(num_classes=num_classes, memory_samples=memory_samples, **overrides)
    return get_pgp_model(copy.deepcopy(backbone_model), config)


def rank_summary(model) -> dict:
    ranks = model.memory.ranks()
    dims = {name: model.memory.dim(name) for name in ranks}
    return {
        "num_spaces": len(ranks),
        "space_dim": sorted(set(dims.values())),
        "total_rank": int(sum(ranks.values())),
        "total_dim": int(sum(dims.values())),
        "max_rank_fraction": float(max(ranks[n] / dims[n] for n in ranks)),
        "ranks": ranks,
    }


def update_vs_forward(model, batches, task_id: int, rounds: int) -> dict:
    from pgp_peft.memory import update_memory

    empty = {k: v.clone() for k, v in model.memory.state_dict().items()}

    def update():
        model.memory.load_state_dict(empty)
        update_memory(model, batches, task_id)

    @torch.no_grad()
    def forward():
        model.eval()
        for batch in batches:
            model(batch)
        model.train()

    times, per_round = interleaved(
        {"update": update, "forward": forward}, rounds=rounds, per_round=1, warmup=1
    )
    peak_update = common.peak_cpu_bytes(update)
    peak_forward = common.peak_cpu_bytes(forward)
    return {
        "update": summary(times["update"]),
        "forward": summary(times["forward"]),
        "ratio_update_vs_forward": paired_ratio(per_round, "update", "forward"),
        "peak_bytes_update": peak_update,
        "peak_bytes_forward": peak_forward,
        "bases_buffer_bytes": tensor_bytes(model.memory.buffers()),
        **rank_summary(model),
    }


def step_share(model, pixels, labels, task_id: int, steps: int) -> dict:
    """Projection-alone time vs a training step without projection (interleaved with one with it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)

    def step(use_pgp: bool):
        model.config.use_pgp = use_pgp
        model(pixels, labels=labels, task_id=task_id).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        model.project_gradients_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    times, per_round = interleaved(
        {"on": lambda: step(True), "off": lambda: step(False)}, rounds=steps, per_round=1, warmup=1
    )
    model.config.use_pgp = True
    model(pixels, labels=labels, task_id=task_id).loss.backward()
    samples = []
    for _ in range(30):
        start = time.perf_counter()
        model.project_gradients_()
        samples.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    projection_ms = float(np.median(samples) * 1e3)
    off_ms = summary(times["off"])["median_ms"]
    return {
        "batch_size": pixels.shape[0],
        "step_off": summary(times["off"]),
        "step_on": summary(times["on"]),
        "paired_ratio": paired_ratio(per_round, "on", "off"),
        "projection_only_ms": projection_ms,
        "projection_share_of_step": projection_ms / off_ms,
    }


def vs_hidden_size(pixels: dict[int, torch.Tensor], rounds: int) -> list[dict]:
    rows = []
    memory = torch.cat([pixels[0][:16], pixels[1][:16]])  # 32 samples of task 0 (classes 0, 1)
    batches = list(memory.split(BATCH))
    train = torch.cat([pixels[2][:4], pixels[3][:4]])
    labels = torch.tensor([2] * 4 + [3] * 4)
    for hidden in HIDDEN_SIZES if not common.QUICK else HIDDEN_SIZES[:2]:
        heads = max(1, hidden // 64)
        backbone_model = common.random_backbone(
            0,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            num_hidden_layers=2,
        )
        for method in ("l2p", "dualprompt"):
            overrides = {"g_prompt_layers": [0], "e_prompt_layers": [1]} if method == "dualprompt" else {}
            model = build(method, backbone_model, memory.shape[0], **overrides)
            model.register_task_classes(0, [0, 1])
            row = {
                "hidden_size": hidden,
                "num_heads": heads,
                "depth": 2,
                "method": method,
                "memory_samples": memory.shape[0],
            }
            row.update(update_vs_forward(model, batches, 0, rounds))
            from pgp_peft.memory import update_memory

            update_memory(model, batches, 0)
            model.register_task_classes(1, [2, 3])
            model.begin_task(1)
            row["step"] = step_share(model, train, labels, 1, steps=3 if hidden >= 384 else 5)
            rows.append(row)
            common.log(
                f"scaling D={hidden} {method}: update {row['update']['median_ms']:.0f} ms, "
                f"ratio {row['ratio_update_vs_forward']['median']:.2f}, proj share {row['step']['projection_share_of_step']:.4f}"
            )
    return rows


def vs_samples(pixels: dict[int, torch.Tensor], backbone_model, rounds: int) -> list[dict]:
    rows = []
    pool = torch.cat([pixels[0], pixels[1]])
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
    for count in SAMPLE_COUNTS if not common.QUICK else SAMPLE_COUNTS[:2]:
        count = min(count, pool.shape[0])
        batches = list(pool[order[:count]].split(128))
        for method in ("l2p", "dualprompt"):
            model = build(method, backbone_model, count)
            model.register_task_classes(0, [0, 1])
            row = {"memory_samples": count, "method": method}
            row.update(update_vs_forward(model, batches, 0, rounds))
            rows.append(row)
            common.log(f"scaling samples={count} {method}: update {row['update']['median_ms']:.0f} ms")
    return rows


def vs_tasks(pixels: dict[int, torch.Tensor], backbone_model) -> list[dict]:
    from pgp_peft.memory import update_memory

    rows = []
    train = pixels[9][:32]
    for method in ("l2p", "dualprompt"):
        model = build(method, backbone_model, 256, num_classes=NUM_TASKS)
        for task in range(NUM_TASKS if not common.QUICK else 3):
            model.register_task_classes(task, [task])
            model.begin_task(task)
            batches = list(pixels[task][:256].split(128))
            before = {k: v.clone() for k, v in model.memory.state_dict().items()}
            samples = []
            for _ in range(3):
                model.memory.load_state_dict(before)
                start = time.perf_counter()
                update_memory(model, batches, task)
                samples.append(time.perf_counter() - start)
            labels = torch.full((train.shape[0],), task)
            model.train()
            model.zero_grad(set_to_none=True)
            model(train, labels=labels, task_id=task).loss.backward()
            projection = []
            for _ in range(30):
                start = time.perf_counter()
                model.project_gradients_()
                projection.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            row = {
                "method": method,
                "tasks_seen": task + 1,
                "update_ms": float(np.median(samples) * 1e3),
                "projection_only_ms": float(np.median(projection) * 1e3),
                "bases_buffer_bytes": tensor_bytes(model.memory.buffers()),
                "bases_used_bytes": int(sum(model.memory.basis(n).numel() * 4 for n in model.memory.names)),
                **rank_summary(model),
            }
            rows.append(row)
        common.log(
            f"scaling tasks {method}: final total rank {rows[-1]['total_rank']}/{rows[-1]['total_dim']}"
        )
    return rows


def main() -> None:
    threads = common.set_threads()
    started = time.perf_counter()
    pixels = fashion_pixels(1024 if not common.QUICK else 40, list(range(10)))
    backbone_model = common.shipped_backbone()
    result = {
        "benchmark": "scaling",
        "torch_threads": threads,
        "vs_hidden_size": vs_hidden_size(pixels, 2 if common.QUICK else 3),
        "vs_memory_samples": vs_samples(pixels, backbone_model, 2 if common.QUICK else 3),
        "vs_tasks": vs_tasks(pixels, backbone_model),
        "environment": common.environment(),
    }
    result["seconds"] = time.perf_counter() - started
    common.write_json("scaling.json", result)


if __name__ == "__main__":
    main()
