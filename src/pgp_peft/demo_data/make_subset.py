"""Build ``fashion_mnist_subset.npz``: a small, balanced, seeded Fashion-MNIST subset.

Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
which installs Zalando Research's four gzip idx files under ``/usr/share/datasets/fashion-mnist``.

Usage::

    python src/pgp_peft/demo_data/make_subset.py [--source DIR] [--train-per-class 300]
        [--test-per-class 100] [--seed 0] [--out src/pgp_peft/demo_data/fashion_mnist_subset.npz]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

CLASS_NAMES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip idx file (ubyte) -> uint8 array of shape (N,) or (N, 28, 28)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class`` indices of every class without replacement; returned sorted (N,)."""
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)
    ]
    # Sorted so the subset keeps the source file's order (the classes stay interleaved).
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fashion_mnist_subset.npz"))
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, per_class in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        idx = balanced_indices(labels, per_class, rng)
        arrays[f"x_{split}"] = images[idx]
        arrays[f"y_{split}"] = labels[idx].astype(np.int64)
        arrays[f"source_index_{split}"] = idx.astype(np.int32)
    np.savez_compressed(args.out, class_names=np.array(CLASS_NAMES), **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): " + ", ".join(f"{k}{v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
