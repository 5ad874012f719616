"""LoRA-PGP vs sequential LoRA on the forgetting benchmark's data and protocol, next to L2P(-PGP) and
DualPrompt(-PGP).

Class-incremental Fashion-MNIST, 5 tasks x 2 classes, the shipped CIFAR-10-pretrained tiny ViT frozen,
`common.PROTOCOL` (AdamW lr 0.01 constant, 2 epochs, batch 32, clip 1.0, 256 memory samples, seeds
0,1,2). Per run: the accuracy matrix and its summary (both forgetting definitions), the task-0 drift
(logits and features of the task-0 test images after task 0 vs after the last task), the old-input
drift of every adapted layer (the change of s·B·A·x on the task-0 test images' recorded inputs x,
relative to the layer's output W0 x + b + s·B·A·x), the protected dimensions of every space after
every task, the median step time with and without projection and the memory-update time.

LoRA runs use the `LoraPGPMethod` unit in a training loop written out below with the protocol of
`ContinualTrainer` (a fresh AdamW per task, class mask `task` while training, clip -> project ->
step, optional update projection, memory update at the task's end from a seeded 256-sample subset,
class-IL / task-IL evaluation). L2P / DualPrompt rows are read from results/forgetting_fashion_mnist.json
(same data, protocol, seeds and backbone; `bench_forgetting.py`).

    python benchmarks/bench_lora.py            # -> results/lora.json
"""

from __future__ import annotations

import argparse
import copy
import time

import common
import numpy as np
import torch
from torch import nn

# (label, use_pgp, threshold, project_update)
VARIANTS = [
    ("lora", False, None, False),
    ("lora-pgp eps=0.97", True, 0.97, False),
    ("lora-pgp eps=0.97 +update", True, 0.97, True),
    ("lora-pgp eps=0.99 +update", True, 0.99, True),
    ("lora-pgp eps=0.90 +update", True, 0.90, True),
    ("lora-pgp eps=0.999 +update", True, 0.999, True),
]
LORA = {"r": 10, "lora_alpha": 10.0, "target_modules": ["k_proj", "v_proj"]}  # InfLoRA's r and targets
MEMORY_BATCH = 128


def _batches(pixels: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(pixels.shape[0], generator=generator)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield pixels[rows], labels[rows]


@torch.no_grad()
def _evaluate(method, head, pixels, labels, class_task, task_id: int) -> tuple[float, float]:
    logits = head(method.features(pixels))
    cil = logits.masked_fill(~(class_task >= 0), float("-inf")).argmax(-1)
    til = logits.masked_fill(~(class_task == task_id), float("-inf")).argmax(-1)
    return float((cil == labels).float().mean() * 100), float((til == labels).float().mean() * 100)


@torch.no_grad()
def _update_memory(method, memory, pixels: torch.Tensor, threshold: float) -> None:
    from pgp_peft.projection import GramAccumulator

    grams = {name: GramAccumulator(dim) for name, dim in method.protected_spaces().items()}
    for batch in pixels.split(MEMORY_BATCH):
        for name, rows in method.memory_rows(batch).items():
            grams[name].add(rows)
    for name, gram in grams.items():
        memory.update_feature(name, gram.gram, threshold)


@torch.no_grad()
def _layer_outputs(
    method, layer_inputs: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (s·B·A·x, full output W0 x + b + s·B·A·x)} on recorded inputs."""
    out = {}
    for path, x in layer_inputs.items():
        a, b = method.lora_weights(path)
        delta = method.scaling(path) * (x @ a.T @ b.T)
        base = method._layers[path].base_layer(x)
        out[path] = (delta, base + delta)
    return out


def lora_run(
    *, splits, backbone_model, use_pgp: bool, threshold: float | None, project_update: bool, seed: int
):
    from transformers.trainer_utils import set_seed

    from pgp_peft.backbones import build_backbone
    from pgp_peft.data import memory_subset
    from pgp_peft.methods.lora import LoraPGPMethod, LoraPGPSettings
    from pgp_peft.metrics import summarize
    from pgp_peft.projection import NullSpaceMemory, project_update_

    protocol = common.PROTOCOL
    num_tasks = splits.num_tasks
    torch.manual_seed(seed)
    backbone = build_backbone(copy.deepcopy(backbone_model))
    method = LoraPGPMethod(LoraPGPSettings(**LORA), backbone)
    head = nn.Linear(backbone.hidden_size, splits.num_classes)
    memory = NullSpaceMemory(method.protected_spaces())
    class_task = torch.full((splits.num_classes,), -1, dtype=torch.long)
    train = [
        (common.eval_pixels(d), torch.tensor(d["labels"], dtype=torch.long)) for d in splits.train
    ]  # augment=False: the train transform is the eval transform
    test = [(common.eval_pixels(d), torch.tensor(d["labels"], dtype=torch.long)) for d in splits.test]
    params = [p for p, _, _ in method.protected_slices()] + list(head.parameters())
    acc = np.full((num_tasks, num_tasks), np.nan)
    acc_til = np.full((num_tasks, num_tasks), np.nan)
    ranks, step_seconds, memory_seconds = [], {"projected": [], "plain": []}, []
    probe: dict = {}
    for task_id in range(num_tasks):
        set_seed(seed + task_id)
        class_task[splits.task_classes[task_id]] = task_id
        optimizer = torch.optim.AdamW(params, lr=protocol["learning_rate"], weight_decay=0.0)
        task_mask = class_task == task_id
        generator = torch.Generator().manual_seed(seed + task_id)
        pixels, labels = train[task_id]
        project = use_pgp and not memory.is_empty()
        for _ in range(protocol["epochs"]):
            for batch, target in _batches(pixels, labels, protocol["batch_size"], generator):
                started = time.perf_counter()
                logits = head(method.features(batch)).masked_fill(~task_mask, float("-inf"))
                loss = nn.functional.cross_entropy(logits, target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, protocol["max_grad_norm"])
                snapshots = None
                if project:
                    for parameter, index, names in method.protected_slices():
                        memory.project_(parameter.grad[index], names[0])
                    if project_update:
                        snapshots = [p.detach()[i].clone() for p, i, _ in method.protected_slices()]
                optimizer.step()
                if snapshots is not None:
                    for (parameter, index, names), before in zip(method.protected_slices(), snapshots):
                        project_update_(
                            parameter.data[index], before, lambda d, n=names[0]: memory.project_(d, n)
                        )
                optimizer.zero_grad(set_to_none=True)
                step_seconds["projected" if project else "plain"].append(time.perf_counter() - started)
        if use_pgp:
            memory_pixels = common.eval_pixels(
                memory_subset(splits.train[task_id], protocol["memory_samples"], seed + task_id)
            )
            started = time.perf_counter()
            _update_memory(method, memory, memory_pixels, threshold)
            memory_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                for batch in memory_pixels.split(MEMORY_BATCH):
                    method.features(batch)
            memory_seconds[-1] = (memory_seconds[-1], time.perf_counter() - started)
        ranks.append(memory.ranks())
        for evaluated in range(task_id + 1):
            acc[evaluated, task_id], acc_til[evaluated, task_id] = _evaluate(  # A[task, after task]
                method, head, *test[evaluated], class_task, evaluated
            )
        if task_id in (0, num_tasks - 1):
            with torch.no_grad(), method.record_inputs() as inputs:
                features = method.features(test[0][0])
            if task_id == 0:
                probe["inputs"] = {k: v.clone() for k, v in inputs.items()}
            logits = head(features)[:, splits.task_classes[0]].detach()
            probe[task_id] = (logits, features.detach(), _layer_outputs(method, probe["inputs"]))
    summary = summarize(acc)
    (l0, f0, layers0), (l1, f1, layers1) = probe[0], probe[num_tasks - 1]
    layer_drift = {
        path: float((layers1[path][0] - layers0[path][0]).norm() / layers0[path][1].norm())
        for path in layers0
    }
    diag = np.diagonal(acc)
    return {
        "average_accuracy": summary["average_accuracy"],
        "forgetting_paper": summary["forgetting_paper"],
        "forgetting_reference": summary["forgetting_reference"],
        "backward_transfer": summary["backward_transfer"],
        "task_il_average_accuracy": summarize(acc_til)["average_accuracy"],
        "new_task_accuracy": float(np.mean(diag[1:])),
        "task0_logit_drift": common.relative_change(l0, l1),
        "task0_feature_drift": common.relative_change(f0, f1),
        "layer_drift": layer_drift,
        "accuracy_matrix": acc.tolist(),
        "memory_ranks_per_task": ranks,
        "memory_dims": {name: memory.dim(name) for name in memory.names},
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "step_ms_median": {k: float(np.median(v) * 1e3) if v else None for k, v in step_seconds.items()},
        "memory_update_vs_forward_seconds": memory_seconds,
    }


def prompt_trainable_parameters() -> dict[str, int]:
    """Trainable tensors of the L2P / DualPrompt presets on the shipped backbone (prompts, keys, head)."""
    from pgp_peft import get_pgp_model

    out = {}
    for method in ("l2p", "dualprompt"):
        model = get_pgp_model(common.shipped_backbone(), common.make_config(method, True))
        out[method] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default=",".join(label for label, *_ in VARIANTS))
    args = parser.parse_args()
    threads = common.set_threads()
    protocol = common.PROTOCOL
    wanted = args.variants.split(",")
    started = time.perf_counter()
    backbone_model = common.shipped_backbone()
    runs, sources = [], set()
    for seed in common.seeds():
        splits, source = common.make_splits(
            "fashion_mnist",
            protocol["train_per_class"],
            protocol["test_per_class"],
            seed,
            protocol["num_tasks"],
        )
        sources.add(source)
        for label, use_pgp, threshold, project_update in VARIANTS:
            if label not in wanted:
                continue
            run_started = time.perf_counter()
            result = lora_run(
                splits=splits,
                backbone_model=backbone_model,
                use_pgp=use_pgp,
                threshold=threshold,
                project_update=project_update,
                seed=seed,
            )
            result.update(
                variant=label, use_pgp=use_pgp, threshold=threshold, project_update=project_update, seed=seed,
                seconds=time.perf_counter() - run_started,
            )  # fmt: skip
            runs.append(result)
            common.log(
                f"{label} seed={seed}: acc {result['average_accuracy']:.1f} forg {result['forgetting_paper']:.1f} "
                f"drift {result['task0_feature_drift']:.3f} max layer drift {max(result['layer_drift'].values()):.4f} "
                f"({result['seconds']:.0f}s)"
            )
    common.write_json(
        "lora.json",
        {
            "benchmark": "lora",
            "dataset": "fashion_mnist",
            "data_source": sorted(sources),
            "protocol": protocol,
            "lora": LORA,
            "backbone": common.BACKBONE_LABELS["pretrained"],
            "seeds": common.seeds(),
            "prompt_methods_from": "results/forgetting_fashion_mnist.json (backbone 'pretrained')",
            "prompt_trainable_parameters": prompt_trainable_parameters(),
            "torch_threads": threads,
            "environment": common.environment(),
            "seconds": time.perf_counter() - started,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
