"""Sweep of the feature-mode energy thresholds (prompt_threshold = key_threshold = eps).

One benchmark: Fashion-MNIST, 5 tasks x 2 classes, the shipped CIFAR-10-pretrained tiny ViT, the
same protocol and seeds as `bench_forgetting.py`. Runs whose configuration is identical to one in
results/forgetting_fashion_mnist.json (eps = 0.97, the default, and the no-PGP baseline) are
reused from it rather than trained again (same seed -> same run on CPU).

    python benchmarks/bench_thresholds.py --method l2p      # -> results/thresholds_l2p.json
"""

from __future__ import annotations

import argparse
import time

import common
from bench_forgetting import run_grid

THRESHOLDS = [0.5, 0.8, 0.9, 0.95, 0.97, 0.99]
DEFAULT = 0.97
DATASET, BACKBONE = "fashion_mnist", "pretrained"


def reusable(method: str) -> dict[tuple, dict]:
    """(use_pgp, seed) -> run, from the forgetting benchmark when its protocol matches."""
    path = common.RESULTS / f"forgetting_{DATASET}.json"
    if not path.exists():
        return {}
    payload = common.load_json(path)
    if payload.get("protocol") != common.PROTOCOL:
        return {}
    return {
        (run["use_pgp"], run["seed"]): run
        for run in payload["runs"]
        if run["backbone"] == BACKBONE and run["method"] == method and run["variant"] == "default"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["l2p", "dualprompt"], required=True)
    args = parser.parse_args()
    threads = common.set_threads()
    started = time.perf_counter()
    seed_list = common.seeds()
    found = reusable(args.method)
    runs = []
    for seed in seed_list:
        for use_pgp, eps in [(False, None)] + [(True, t) for t in THRESHOLDS]:
            reuse_key = (use_pgp, seed) if (eps is None or eps == DEFAULT) else None
            if reuse_key in found:
                run = dict(found[reuse_key], threshold=eps, reused_from=f"forgetting_{DATASET}.json")
                runs.append(run)
                continue
            overrides = {} if eps is None else {f"eps={eps}": {"prompt_threshold": eps, "key_threshold": eps}}
            new, _ = run_grid(DATASET, [BACKBONE], [args.method], [use_pgp], [seed], overrides or None)
            for run in new:
                run["threshold"] = eps
            runs.extend(new)
    common.write_json(
        f"thresholds_{args.method}.json",
        {
            "benchmark": "thresholds",
            "dataset": DATASET,
            "backbone": common.BACKBONE_LABELS[BACKBONE],
            "method": args.method,
            "thresholds": THRESHOLDS,
            "default": DEFAULT,
            "protocol": common.PROTOCOL,
            "seeds": seed_list,
            "torch_threads": threads,
            "environment": common.environment(),
            "seconds": time.perf_counter() - started,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
