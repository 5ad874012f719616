"""LoRA-PGP vs sequential LoRA on the forgetting benchmark's data and protocol, next to L2P(-PGP) and
DualPrompt(-PGP).

Class-incremental Fashion-MNIST, 5 tasks x 2 classes, the shipped CIFAR-10-pretrained tiny ViT frozen,
`common.PROTOCOL` (AdamW lr 0.01 constant, 2 epochs, batch 32, clip 1.0, 256 memory samples, seeds
0,1,2), every run through `get_pgp_model(vit, PromptGradientProjectionConfig.lora(...))` and
`ContinualTrainer` (`common.continual_run`). Per run: the accuracy matrix and its summary (both
forgetting definitions), the task-0 drift (logits and features of the task-0 test images after task 0
vs after the last task), the old-input drift of every adapted layer (the change of s·B·A·x on the task-0
test images' recorded inputs x, relative to the layer's output W0 x + b + s·B·A·x), the protected
dimensions of every space after every task, the median optimizer-step time with and without bases
and the memory-update time vs a plain forward over the same memory samples. L2P / DualPrompt rows are
read from results/forgetting_fashion_mnist.json (same data, protocol, seeds and backbone;
`bench_forgetting.py`).

    python benchmarks/bench_lora.py            # -> results/lora.json
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
import torch

# (label, use_pgp, threshold, project_update, lora_b_threshold)
VARIANTS = [
    ("lora", False, None, False, None),
    ("lora-pgp eps=0.97", True, 0.97, False, None),
    ("lora-pgp eps=0.97 +update", True, 0.97, True, None),
    ("lora-pgp eps=0.99 +update", True, 0.99, True, None),
    ("lora-pgp eps=0.90 +update", True, 0.90, True, None),
    ("lora-pgp eps=0.999 +update", True, 0.999, True, None),
    ("lora-pgp eps=0.999 B 0.97 +update", True, 0.999, True, 0.97),
    ("lora-pgp eps=0.99 B 0.9 +update", True, 0.99, True, 0.9),
]
LORA = {"r": 10, "lora_alpha": 10.0, "target_modules": ["k_proj", "v_proj"]}  # InfLoRA's r and targets


@torch.no_grad()
def _layer_outputs(
    method, layer_inputs: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (s·B·A·x, the layer's full output W0 x + b + s·B·A·x)} on recorded inputs x."""
    out = {}
    for path, x in layer_inputs.items():
        a, b = method.lora_weights(path)
        delta = method.scaling(path) * (x @ a.T @ b.T)
        base = method.backbone.model.get_submodule(path).base_layer(x)
        out[path] = (delta, base + delta)
    return out


def lora_run(
    *,
    splits,
    backbone_model,
    use_pgp: bool,
    threshold: float | None,
    project_update: bool,
    seed: int,
    lora_b_threshold: float | None = None,
):
    from transformers import TrainerCallback

    protocol = common.PROTOCOL
    last = splits.num_tasks - 1
    task0_pixels = common.eval_pixels(splits.test[0])
    probe: dict = {}
    steps: dict[str, list[float]] = {"projected": [], "plain": []}
    memory_seconds: list[tuple[float, float]] = []

    def setup(trainer, model) -> None:
        from pgp_peft.callbacks import TaskEndFunction

        method = model.method

        class StepTimer(TrainerCallback):
            """Wall time of each optimizer step: forward, backward, clip, projection, Adam, update projection."""

            def on_step_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                projected = model.config.use_pgp and not model.memory.is_empty()
                steps["projected" if projected else "plain"].append(time.perf_counter() - self.started)

        trainer.add_callback(StepTimer())
        update_memory = trainer.update_memory

        def timed_update_memory(task_id: int):
            started = time.perf_counter()
            ranks = update_memory(task_id)
            if model.config.use_pgp:
                update = time.perf_counter() - started
                model.eval()
                started = time.perf_counter()
                with torch.no_grad():
                    for batch in trainer._memory_batches(task_id):
                        model(batch["pixel_values"])
                memory_seconds.append((update, time.perf_counter() - started))
                model.train()
            return ranks

        trainer.update_memory = timed_update_memory

        @torch.no_grad()
        def layer_probe(trainer, task_id, result) -> None:
            if task_id not in (0, last):
                return
            was_training = model.training
            model.eval()
            with method.record_inputs() as inputs:
                model(task0_pixels, class_mask="all")
            model.train(was_training)
            if task_id == 0:
                probe["inputs"] = {path: x.clone() for path, x in inputs.items()}
            probe[task_id] = _layer_outputs(method, probe["inputs"])

        trainer.add_callback(TaskEndFunction(layer_probe))

    overrides = {"memory_samples": protocol["memory_samples"], "project_update": project_update, **LORA}
    if threshold is not None:
        overrides["prompt_threshold"] = threshold
    if lora_b_threshold is not None:
        overrides["lora_b_threshold"] = lora_b_threshold
    result = common.continual_run(
        splits=splits,
        backbone_model=backbone_model,
        method="lora",
        use_pgp=use_pgp,
        seed=seed,
        epochs=protocol["epochs"],
        lr=protocol["learning_rate"],
        batch_size=protocol["batch_size"],
        config_overrides=overrides,
        setup=setup,
    )
    layers0, layers1 = probe[0], probe[last]
    result["layer_drift"] = {
        path: float((layers1[path][0] - layers0[path][0]).norm() / layers0[path][1].norm())
        for path in layers0
    }
    result["trainable_parameters"] = None  # filled in main() from a fresh model (same for every run)
    result["step_ms_median"] = {k: float(np.median(v) * 1e3) if v else None for k, v in steps.items()}
    result["memory_update_vs_forward_seconds"] = memory_seconds
    return result


def trainable_parameters() -> dict[str, int]:
    """Trainable tensors of each method on the shipped backbone (prompts and keys or LoRA A/B, and the head)."""
    from pgp_peft import get_pgp_model

    out = {}
    for method, overrides in (("l2p", {}), ("dualprompt", {}), ("lora", LORA)):
        model = get_pgp_model(common.shipped_backbone(), common.make_config(method, True, **overrides))
        out[method] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants",
        default=",".join(label for label, *_ in VARIANTS),
        help="comma-separated labels to run; the runs of the other variants already in results/lora.json are kept",
    )
    args = parser.parse_args()
    threads = common.set_threads()
    protocol = common.PROTOCOL
    wanted = args.variants.split(",")
    started = time.perf_counter()
    backbone_model = common.shipped_backbone()
    counts = trainable_parameters()
    previous = common.RESULTS / "lora.json"
    kept = (
        [r for r in common.load_json(previous)["runs"] if r["variant"] not in wanted]
        if previous.exists()
        else []
    )
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
        for label, use_pgp, threshold, project_update, b_threshold in VARIANTS:
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
                lora_b_threshold=b_threshold,
            )
            result.update(
                trainable_parameters=counts["lora"],
                variant=label, use_pgp=use_pgp, threshold=threshold, project_update=project_update, seed=seed,
                lora_b_threshold=b_threshold,
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
            "prompt_trainable_parameters": {k: v for k, v in counts.items() if k != "lora"},
            "torch_threads": threads,
            "environment": common.environment(),
            "seconds": time.perf_counter() - started,
            "runs": kept + runs,
            "runs_kept_from_an_earlier_invocation": len(kept),
        },
    )


if __name__ == "__main__":
    main()
