"""Anti-forgetting on real offline images: L2P vs L2P-PGP and DualPrompt vs DualPrompt-PGP.

Class-incremental 5 tasks x 2 classes on Fashion-MNIST (Debian `dataset-fashion-mnist`) or
scikit-learn digits, resized to 32x32 RGB, on two frozen backbones: the shipped CIFAR-10-pretrained
tiny ViT and a random-init ViT of the same architecture. Every run goes through `ContinualTrainer`.

    python benchmarks/bench_forgetting.py --dataset fashion_mnist     # -> results/forgetting_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import time

import common


def run_grid(
    dataset: str, backbones: list[str], methods: list[str], pgp_values: list[bool], seed_list, overrides=None
):
    protocol = common.PROTOCOL
    runs, sources = [], set()
    models = {kind: common.backbone(kind) for kind in backbones}
    for seed in seed_list:
        splits, source = common.make_splits(
            dataset, protocol["train_per_class"], protocol["test_per_class"], seed, protocol["num_tasks"]
        )
        sources.add(source)
        for kind in backbones:
            for method in methods:
                for use_pgp in pgp_values:
                    for label, extra in (overrides or {"default": {}}).items():
                        started = time.perf_counter()
                        result = common.continual_run(
                            splits=splits,
                            backbone_model=models[kind],
                            method=method,
                            use_pgp=use_pgp,
                            seed=seed,
                            epochs=protocol["epochs"],
                            lr=protocol["learning_rate"],
                            batch_size=protocol["batch_size"],
                            config_overrides={"memory_samples": protocol["memory_samples"], **extra},
                        )
                        result.update(
                            dataset=dataset, backbone=kind, method=method, use_pgp=use_pgp, seed=seed,
                            variant=label, config_overrides=extra,
                        )  # fmt: skip
                        runs.append(result)
                        common.log(
                            f"{dataset} {kind} {method} pgp={use_pgp} {label} seed={seed}: "
                            f"acc {result['average_accuracy']:.1f} forg {result['forgetting_paper']:.1f} "
                            f"drift {result['task0_logit_drift']:.3f} ({time.perf_counter() - started:.0f}s)"
                        )
    return runs, sorted(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["fashion_mnist", "digits"], required=True)
    parser.add_argument("--backbones", default="pretrained,random")
    parser.add_argument("--methods", default="l2p,dualprompt")
    args = parser.parse_args()
    threads = common.set_threads()
    started = time.perf_counter()
    runs, sources = run_grid(
        args.dataset, args.backbones.split(","), args.methods.split(","), [False, True], common.seeds()
    )
    common.write_json(
        f"forgetting_{args.dataset}.json",
        {
            "benchmark": "forgetting",
            "dataset": args.dataset,
            "data_source": sources,
            "protocol": common.PROTOCOL,
            "backbones": {k: common.BACKBONE_LABELS[k] for k in args.backbones.split(",")},
            "seeds": common.seeds(),
            "torch_threads": threads,
            "environment": common.environment(),
            "seconds": time.perf_counter() - started,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
