"""Shared pieces of the benchmarks: real offline data, backbones, one continual run, timing helpers.

The benchmarks are *users* of `pgp_peft`: everything goes through its public API
(`get_pgp_model`, `ContinualTrainer`, `make_class_incremental_splits`, `build_transform`,
`pgp_peft.memory.update_memory`). Nothing here patches the library.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
QUICK = os.environ.get("BENCH_QUICK") == "1"  # smoke test of the pipeline: tiny sizes, numbers meaningless

# The continual-learning protocol shared by the forgetting benchmark and the threshold sweep.
PROTOCOL: dict[str, Any] = {
    "num_tasks": 5,
    "classes_per_task": 2,
    "train_per_class": 100,  # seeded balanced subset per seed: 200 training images per task
    "test_per_class": 50,  # 100 test images per task
    "epochs": 2,
    "batch_size": 32,
    "learning_rate": 0.01,  # Adam, constant; = the demo recipe's base_lr 0.08 x 32 / 256
    "max_grad_norm": 1.0,
    "image_size": 32,
    "augment": False,
    "memory_samples": 256,  # config default (>= the 200 training images: the whole task)
    "class_order": "natural (task t = classes 2t, 2t+1)",
}
if QUICK:
    PROTOCOL.update(train_per_class=8, test_per_class=6, epochs=1)


def seeds() -> list[int]:
    default = "0" if QUICK else "0,1,2"
    return [int(s) for s in os.environ.get("BENCH_SEEDS", default).split(",")]


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SHIPPED_BACKBONE = "pgp_peft:vit-tiny-patch4-32-cifar10"


def set_threads() -> int:
    """One intra-op thread per process by default (BENCH_THREADS overrides).

    On 2 shared cores, 2 OpenMP threads per process collapse as soon as anything else runs
    (measured here: a plain tiny-ViT forward went from 56 ms with 1 thread to 389 ms with 2 under
    load). The accuracy grids instead run two single-threaded worker processes side by side.
    """
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    import accelerate
    import datasets
    import torch
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import sklearn

        sklearn_version = sklearn.__version__
    except ImportError:
        sklearn_version = None
    import pgp_peft

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average_1_5_15": [round(x, 2) for x in load] if load else None,
        "torch_threads_per_process": int(os.environ.get("BENCH_THREADS", "1")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn_version,
        "pgp_peft": pgp_peft.__version__,
        "git_commit": commit,
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    from pgp_peft.metrics import write_results_json

    return write_results_json(RESULTS / name, payload)


# ----------------------------------------------------------------------------- data
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    rows = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def fashion_mnist_arrays(train_per_class: int, test_per_class: int, seed: int):
    """(x_train, y_train, x_test, y_test, names, source): 28x28 uint8, seeded balanced subsets.

    Source: the Debian package `dataset-fashion-mnist` (70k images) if installed, else the
    3,000/1,000-image subset shipped with pgp_peft (`load_demo_dataset`)."""
    rng = np.random.default_rng(seed)
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        x_tr = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
        y_tr = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
        x_te = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
        y_te = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        source = f"Debian dataset-fashion-mnist ({FASHION_DIR}), 60k/10k"
    else:
        from pgp_peft.data import load_demo_dataset

        train, test = load_demo_dataset()
        x_tr = np.stack([np.asarray(im) for im in train["image"]])
        y_tr = np.asarray(train["label"], dtype=np.int64)
        x_te = np.stack([np.asarray(im) for im in test["image"]])
        y_te = np.asarray(test["label"], dtype=np.int64)
        source = "pgp_peft shipped Fashion-MNIST subset (load_demo_dataset), 3k/1k"
    tr, te = _balanced(y_tr, train_per_class, rng), _balanced(y_te, test_per_class, rng)
    return x_tr[tr], y_tr[tr], x_te[te], y_te[te], FASHION_NAMES, source


def digits_arrays(train_per_class: int, test_per_class: int, seed: int):
    """scikit-learn `load_digits` (1,797 8x8 images, 0..16) -> uint8 0..255; a seeded stratified
    train/test split (the data set has no official one: the first 1/3 of each class's seeded
    permutation is the test pool)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    split_rng = np.random.default_rng(1000)  # the train/test partition is fixed across seeds
    train_pool, test_pool = [], []
    for c in range(10):
        rows = split_rng.permutation(np.flatnonzero(labels == c))
        cut = len(rows) // 3
        test_pool.append(rows[:cut])
        train_pool.append(rows[cut:])
    train_pool, test_pool = np.concatenate(train_pool), np.concatenate(test_pool)
    rng = np.random.default_rng(seed)
    tr = train_pool[_balanced(labels[train_pool], train_per_class, rng)]
    te = test_pool[_balanced(labels[test_pool], test_per_class, rng)]
    return (
        images[tr],
        labels[tr],
        images[te],
        labels[te],
        [str(i) for i in range(10)],
        "scikit-learn load_digits",
    )


def to_dataset(x: np.ndarray, y: np.ndarray, names: list[str]):
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in x], "label": y.tolist()}, features=features
    )


def make_splits(dataset: str, train_per_class: int, test_per_class: int, seed: int, num_tasks: int = 5):
    """Class-incremental splits (natural class order, `num_tasks` x 2 classes) + source string."""
    from pgp_peft.data import make_class_incremental_splits

    loader = {"fashion_mnist": fashion_mnist_arrays, "digits": digits_arrays}[dataset]
    x_tr, y_tr, x_te, y_te, names, source = loader(train_per_class, test_per_class, seed)
    splits = make_class_incremental_splits(
        to_dataset(x_tr, y_tr, names), to_dataset(x_te, y_te, names), num_tasks=num_tasks, dataset_id=dataset
    )
    return splits, source


def transforms(image_size: int = 32):
    """Reference preprocessing: greyscale -> RGB, resize to 32x32, [0, 1], no normalisation
    (what the shipped backbone was trained with). No augmentation."""
    from pgp_peft.data import build_transform

    return build_transform(image_size, train=True, augment=False), build_transform(image_size)


def eval_pixels(dataset, image_size: int = 32):
    """All images of a split as a (N, 3, 32, 32) tensor with the eval transform."""
    from pgp_peft.data import build_transform

    return build_transform(image_size)({"image": list(dataset["image"])})["pixel_values"]


# ----------------------------------------------------------------------------- backbones
def shipped_backbone():
    from transformers import ViTModel

    from pgp_peft.backbones import resolve_builtin

    return ViTModel.from_pretrained(resolve_builtin(SHIPPED_BACKBONE), add_pooling_layer=False).eval()


def random_backbone(seed: int = 0, **overrides: Any):
    """The shipped architecture (or `overrides` of it) with transformers' default random init."""
    import torch
    from transformers import ViTConfig, ViTModel

    from pgp_peft.backbones import resolve_builtin

    config = ViTConfig.from_pretrained(resolve_builtin(SHIPPED_BACKBONE))
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return ViTModel(config, add_pooling_layer=False).eval()


def backbone(kind: str):
    return shipped_backbone() if kind == "pretrained" else random_backbone(0)


BACKBONE_LABELS = {
    "pretrained": "shipped `pgp_peft:vit-tiny-patch4-32-cifar10` (CIFAR-10 supervised, frozen)",
    "random": "random-init tiny ViT, same architecture (seed 0, frozen)",
}


# ----------------------------------------------------------------------------- one continual run
def make_config(method: str, use_pgp: bool, **overrides: Any):
    """Paper presets on 10 classes (5 tasks x 2). DualPrompt keeps its layers 0-1 / 2-4 on the 6-layer ViT."""
    from pgp_peft import PromptGradientProjectionConfig as Config

    preset = {"l2p": Config.l2p, "dualprompt": Config.dualprompt, "lora": Config.lora}[method]
    return preset(num_classes=10, num_tasks=5, use_pgp=use_pgp, **overrides)


def relative_change(before, after) -> float:
    import torch

    return float(torch.linalg.norm(after - before) / torch.linalg.norm(before).clamp_min(1e-12))


def training_arguments(output_dir: str, *, batch_size: int, epochs: int, lr: float, seed: int):
    """The protocol's `TrainingArguments`: Adam, constant lr, clipping 1.0, CPU, no logging or saving."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=PROTOCOL["max_grad_norm"],
        seed=seed,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def continual_run(
    *,
    splits,
    backbone_model,
    method: str,
    use_pgp: bool,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    config_overrides: dict[str, Any] | None = None,
    setup=None,
) -> dict[str, Any]:
    """Train the 5-task sequence with `ContinualTrainer`; return the accuracy matrices, the summary
    (`metrics.summarize`) and the old-task drift (task-0 test logits / features after task 0 vs the end).

    `setup(trainer, model)`, if given, runs once before training (extra probes and timers)."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from pgp_peft import ContinualTrainer, get_pgp_model
    from pgp_peft.callbacks import TaskEndFunction
    from pgp_peft.metrics import summarize

    torch.manual_seed(seed)  # prompt / key / head init
    model = get_pgp_model(
        copy.deepcopy(backbone_model), make_config(method, use_pgp, **(config_overrides or {}))
    )
    train_tf, eval_tf = transforms()
    task0_pixels = eval_pixels(splits.test[0])
    task0_classes = splits.task_classes[0]
    snapshots: dict[str, Any] = {}

    @torch.no_grad()
    def probe(trainer, task_id, result):
        if task_id not in (0, splits.num_tasks - 1):
            return
        was_training = model.training
        model.eval()
        out = model(task0_pixels, class_mask="all")
        model.train(was_training)
        ids = out.prompt_ids.clone() if out.prompt_ids is not None else None
        snapshots[task_id] = (out.logits[:, task0_classes].clone(), out.features.clone(), ids)

    with tempfile.TemporaryDirectory(prefix="pgp_bench_") as tmp:
        args = training_arguments(tmp, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
        trainer = ContinualTrainer(
            model,
            args,
            splits=splits,
            train_transform=train_tf,
            eval_transform=eval_tf,
            callbacks=[TaskEndFunction(probe)],
        )
        trainer.remove_callback(PrinterCallback)  # no per-task log dicts on stdout
        if setup is not None:
            setup(trainer, model)
        started = time.perf_counter()
        result = trainer.train_continual()
        seconds = time.perf_counter() - started
    values = result.accuracy.values
    task_il = result.task_il_accuracy.values
    summary = summarize(values)
    last = splits.num_tasks - 1
    (l0, f0, ids0), (l1, f1, ids1) = snapshots[0], snapshots[last]
    diag = np.diagonal(values)
    return {
        "average_accuracy": summary["average_accuracy"],
        "forgetting_paper": summary["forgetting_paper"],
        "forgetting_reference": summary["forgetting_reference"],
        "backward_transfer": summary["backward_transfer"],
        "task_il_average_accuracy": summarize(task_il)["average_accuracy"],
        # plasticity: class-IL accuracy on each new task right after learning it (tasks 1..T-1),
        # and its task-IL counterpart (within-task discrimination, no old-class competition)
        "new_task_accuracy": float(np.mean(diag[1:])),
        "new_task_accuracy_task_il": float(np.mean(np.diagonal(task_il)[1:])),
        "task0_logit_drift": relative_change(l0, l1),
        "task0_feature_drift": relative_change(f0, f1),
        "task0_prompt_selection_changed": None
        if ids0 is None
        else float((ids0.sort(-1).values != ids1.sort(-1).values).any(-1).float().mean()),
        "accuracy_matrix": values.tolist(),
        "memory_ranks": result.memory_ranks[-1] if result.memory_ranks else {},
        "memory_ranks_per_task": result.memory_ranks,
        "memory_dims": {name: model.memory.dim(name) for name in model.memory.names},
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- timing / memory helpers
def median(values) -> float:
    return float(statistics.median(values))


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while `fn()` runs (tensors alive before the call
    are not counted). From the torch profiler's memory accounting: every event's self allocation
    (allocations minus frees inside the op itself, `[memory]` events for frees outside ops) summed
    in start-time order; op granularity, so a temporary freed inside one op is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return int(peak)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
