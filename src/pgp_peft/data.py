"""Class-incremental splits of Hugging Face ``datasets``, image transforms and the offline demo data.

The same code serves Hub ids, local ``imagefolder`` directories and in-memory datasets. Labels are
read through Arrow (instant), tasks are cut with ``select`` (lazy index mappings) and images are
decoded only in the transform (``with_transform``), so nothing here touches pixels up front.
Because of the lazy transforms, a ``transformers.Trainer`` needs ``remove_unused_columns=False``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image as PILImage

# The same atomic (temp file + os.replace) strict-JSON writer as run results; pure numpy, cheap to import.
from .metrics import write_results_json

__all__ = [
    "BatchTransform",
    "ContinualSplits",
    "DecodedImageCache",
    "RowIdTransform",
    "build_transform",
    "collate",
    "load_demo_dataset",
    "load_image_dataset",
    "make_class_incremental_splits",
    "memory_subset",
    "seen_test_datasets",
    "task_datasets",
    "verify_image_files",
    "with_image_transform",
]

LABELS = "labels"  # remapped label column added to every task split (class-order position)
ROW_ID = "row_id"  # row index in the split handed to make_class_incremental_splits (for error messages)
DEMO_FILE = "fashion_mnist_subset.npz"
Transform = Callable[[dict[str, list[Any]]], dict[str, torch.Tensor]]  # batch of columns -> tensors


@dataclass
class ContinualSplits:
    """Per-task datasets of a class-incremental benchmark.

    Task ``t`` owns the contiguous remapped label range ``[t*c, (t+1)*c)`` in the ``"labels"`` column.
    """

    train: list[datasets.Dataset]
    test: list[datasets.Dataset]
    class_order: list[int]  # original label ids, in class order
    class_names: list[str]  # readable names, in class order
    task_classes: list[list[int]]  # remapped label ids per task
    image_column: str
    label_column: str
    dataset_id: str | None = None
    class_order_seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    def classes_seen(self, task_id: int) -> int:
        """Number of classes in tasks ``0..task_id`` (the width of the class-IL logit range)."""
        return sum(len(c) for c in self.task_classes[: task_id + 1])

    def task_of_label(self, label: int) -> int:
        """Task owning a remapped label."""
        for task_id, labels in enumerate(self.task_classes):
            if int(label) in labels:
                return task_id
        raise ValueError(f"label {label} is outside [0, {self.num_classes})")

    def to_manifest(self) -> dict[str, Any]:
        """JSON-able description of the split, saved with a run so it can be reproduced."""
        return {
            "dataset": self.dataset_id,
            "class_order_seed": self.class_order_seed,
            "num_tasks": self.num_tasks,
            "num_classes": self.num_classes,
            "class_order": list(self.class_order),
            "class_names": list(self.class_names),
            "task_classes": [list(c) for c in self.task_classes],
            "train_sizes": [len(d) for d in self.train],
            "test_sizes": [len(d) for d in self.test],
            "image_column": self.image_column,
            "label_column": self.label_column,
        }


def _labels(ds: datasets.Dataset, column: str) -> np.ndarray:
    """Label column as an int64 array (N,), read through Arrow (numpy format decodes far slower).

    Float labels are refused (casting would merge 0.2 and 0.7 into class 0), as are strings."""
    values = ds.with_format("arrow")[column]
    kind = getattr(values, "type", None)
    if kind is not None and (
        pa.types.is_floating(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    ):
        examples = values.slice(0, 3).to_pylist()
        raise ValueError(
            f"label column {column!r} holds {kind} values (e.g. {examples}); labels must be integer class ids. "
            f"Map them to integers, e.g. dataset.class_encode_column({column!r}) for names"
        )
    return np.asarray(values.to_numpy(), dtype=np.int64)


def _check_columns(ds: datasets.Dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what} has no column(s) {missing}; available columns: {ds.column_names}")


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split -> (train_idx, test_idx), sorted. Every class with >= 2 rows gets
    at least one row on each side; a class with one row stays in train."""
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test = 0 if rows.size < 2 else min(max(round(rows.size * fraction), 1), rows.size - 1)
        test_idx.append(rows[:n_test])
        train_idx.append(rows[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_image_dataset(
    name_or_path: str | os.PathLike[str] | datasets.DatasetDict | datasets.Dataset,
    *,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    holdout_fraction: float | None = None,
    holdout_seed: int = 0,
    manifest_path: str | os.PathLike[str] | None = None,
    **load_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load (train, test) from a Hub id, a local directory or an in-memory dataset.

    A ``DatasetDict`` directory saved with ``save_to_disk`` is loaded with ``load_from_disk``; any other directory
    (e.g. ``imagefolder`` class folders) and Hub ids go through ``datasets.load_dataset``.

    ``holdout_fraction``: make the test set a stratified, seeded held-out fraction of the train
    split, or, when there is no train split (ImageNet-R's Hub upload has only ``"test"``), of the
    test split / the only split. A bare ``Dataset`` is such a single split. The row indices are
    written to ``manifest_path`` (JSON) if given. Without it both splits must exist.
    """
    source_name = name_or_path if isinstance(name_or_path, (str, os.PathLike)) else None
    if isinstance(name_or_path, datasets.Dataset):
        splits = datasets.DatasetDict({str(name_or_path.split or train_split): name_or_path})
    elif isinstance(name_or_path, datasets.DatasetDict):
        splits = name_or_path
    elif os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")):
        splits = datasets.load_from_disk(os.fspath(name_or_path))
    else:
        splits = datasets.load_dataset(os.fspath(name_or_path), **load_kwargs)
    if not isinstance(splits, datasets.DatasetDict):  # e.g. streaming=True: select() is needed here
        raise ValueError(f"expected a DatasetDict from {name_or_path!r}, got {type(splits).__name__}")
    available = list(splits.keys())

    if holdout_fraction is None:
        for split in (train_split, test_split):
            if split not in splits:
                raise ValueError(
                    f"split {split!r} not found; available splits: {available} "
                    "(pass holdout_fraction to carve a test set out of a single split)"
                )
        train, test = splits[train_split], splits[test_split]
    else:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if train_split in splits:
            source_split = train_split
        elif test_split in splits:
            source_split = test_split
        elif len(available) == 1:
            source_split = available[0]
        else:
            raise ValueError(
                f"neither {train_split!r} nor {test_split!r} found; available splits: {available}"
            )
        source = splits[source_split]
        _check_columns(source, [image_column, label_column], f"split {source_split!r}")
        train_idx, test_idx = _stratified_holdout(
            _labels(source, label_column), holdout_fraction, holdout_seed
        )
        train, test = source.select(train_idx), source.select(test_idx)
        if manifest_path is not None:
            write_results_json(
                manifest_path,
                {
                    "source": None if source_name is None else os.fspath(source_name),
                    "source_split": source_split,
                    "source_rows": len(source),
                    "label_column": label_column,
                    "holdout_fraction": holdout_fraction,
                    "holdout_seed": holdout_seed,
                    "train_indices": train_idx.tolist(),
                    "test_indices": test_idx.tolist(),
                },
            )
    _check_columns(train, [image_column, label_column], "the train split")
    _check_columns(test, [image_column, label_column], "the test split")
    return train, test


def _class_name(feature: Any, label: int) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return feature.int2str(int(label)).replace("_", " ")
    return str(label)


def _with_remapped_labels(ds: datasets.Dataset, remapped: np.ndarray) -> datasets.Dataset:
    """Add int64 ``labels`` (remapped, -1 for unused classes) and ``row_id`` columns to a whole split.

    Done once per split before ``select``: on a dataset without an index mapping ``add_column`` only
    glues an in-memory column beside the (memory-mapped) table; per-task ``select`` stays lazy.
    """
    ds = ds.remove_columns([c for c in (LABELS, ROW_ID) if c in ds.column_names])
    ds = ds.add_column(LABELS, remapped.tolist(), feature=datasets.Value("int64"))
    return ds.add_column(ROW_ID, list(range(len(ds))), feature=datasets.Value("int64"))


def make_class_incremental_splits(
    train: datasets.Dataset,
    test: datasets.Dataset,
    *,
    num_tasks: int,
    image_column: str = "image",
    label_column: str = "label",
    class_order: Sequence[int] | None = None,
    class_order_seed: int | None = None,
    classes_per_task: int | None = None,
    dataset_id: str | None = None,
) -> ContinualSplits:
    """Cut (train, test) into ``num_tasks`` class-incremental tasks.

    Class order: natural (sorted label ids, as the paper) by default; ``class_order_seed`` ->
    ``np.random.default_rng(seed).permutation``; or an explicit ``class_order`` (may list a
    subset of the classes). The classes must divide evenly over the tasks; otherwise pass
    ``classes_per_task`` to use the first ``num_tasks * classes_per_task`` classes of the order.
    Test rows of unused classes are dropped. Every split gains int64 ``labels`` (remapped; replaces a
    column of that name) and ``row_id`` columns. No image is decoded.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if class_order is not None and class_order_seed is not None:
        raise ValueError("pass either class_order or class_order_seed, not both")
    _check_columns(train, [image_column, label_column], "the train split")
    _check_columns(test, [image_column, label_column], "the test split")
    train_labels, test_labels = _labels(train, label_column), _labels(test, label_column)
    all_classes = np.unique(train_labels)
    unknown = np.setdiff1d(np.unique(test_labels), all_classes)
    if unknown.size:
        raise ValueError(f"test labels {unknown.tolist()} never occur in the train split")

    if class_order is not None:
        order = np.asarray([int(c) for c in class_order], dtype=np.int64)
        if np.unique(order).size != order.size:
            raise ValueError("class_order contains duplicates")
        absent = np.setdiff1d(order, all_classes)
        if absent.size:
            raise ValueError(f"class_order names labels {absent.tolist()} absent from the train split")
    elif class_order_seed is not None:
        order = np.random.default_rng(class_order_seed).permutation(all_classes)
    else:
        order = all_classes

    if classes_per_task is not None:
        if classes_per_task < 1 or num_tasks * classes_per_task > order.size:
            raise ValueError(
                f"{num_tasks} tasks x {classes_per_task} classes per task needs "
                f"{num_tasks * classes_per_task} classes, but {order.size} are available"
            )
        order = order[: num_tasks * classes_per_task]
    elif order.size < num_tasks:
        raise ValueError(f"{order.size} classes cannot fill {num_tasks} tasks (fewer classes than tasks)")
    elif order.size % num_tasks:
        per_task = order.size // num_tasks
        raise ValueError(
            f"{order.size} classes do not divide evenly into {num_tasks} tasks; pass classes_per_task="
            f"{per_task} (uses the first {per_task * num_tasks} classes of the order) or a class_order "
            f"with a multiple of {num_tasks} classes"
        )
    per_task = order.size // num_tasks

    # Original label id -> class-order position; -1 marks classes outside the order.
    position = {int(c): p for p, c in enumerate(order)}
    train_remapped = np.array([position.get(int(c), -1) for c in train_labels], dtype=np.int64)
    test_remapped = np.array([position.get(int(c), -1) for c in test_labels], dtype=np.int64)
    tested = set(np.unique(test_labels).tolist())
    untested = [int(c) for c in order if int(c) not in tested]
    if untested:
        names = [_class_name(train.features[label_column], c) for c in untested]
        warnings.warn(
            f"class(es) {names} (label ids {untested}) have no test images: their accuracy is never measured",
            UserWarning,
            stacklevel=2,
        )
    train_full = _with_remapped_labels(train, train_remapped)
    test_full = _with_remapped_labels(test, test_remapped)

    train_tasks, test_tasks, task_classes = [], [], []
    for t in range(num_tasks):
        lo, hi = t * per_task, (t + 1) * per_task
        task_classes.append(list(range(lo, hi)))
        train_tasks.append(train_full.select(np.flatnonzero((train_remapped >= lo) & (train_remapped < hi))))
        test_rows = np.flatnonzero((test_remapped >= lo) & (test_remapped < hi))
        if test_rows.size == 0:
            raise ValueError(f"task {t} (classes {order[lo:hi].tolist()}) has no test rows")
        test_tasks.append(test_full.select(test_rows))

    feature = train.features[label_column]
    return ContinualSplits(
        train=train_tasks,
        test=test_tasks,
        class_order=[int(c) for c in order],
        class_names=[_class_name(feature, int(c)) for c in order],
        task_classes=task_classes,
        image_column=image_column,
        label_column=label_column,
        dataset_id=dataset_id,
        class_order_seed=class_order_seed,
    )


def _image_file_problem(path: str) -> str | None:
    """Why the image file at `path` is unusable, or None. Cheap: no pixel decode (`Image.verify` walks the
    PNG chunks and CRCs; a JPEG must end with its end-of-image marker)."""
    try:
        with PILImage.open(path) as image:
            image_format = image.format
            image.verify()
        if image_format == "JPEG":
            with open(path, "rb") as handle:
                handle.seek(max(os.path.getsize(path) - 64, 0))
                if b"\xff\xd9" not in handle.read():
                    return "truncated JPEG (no end-of-image marker)"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def verify_image_files(ds: datasets.Dataset, image_column: str, what: str = "dataset") -> int:
    """Check every local image file of an ``imagefolder``-style split up front (before training).

    Rows whose image is a file path (not embedded bytes) are opened and verified without decoding
    pixels. Raises ``ValueError`` listing the unreadable files by path. Returns the number checked.
    """
    if not isinstance(ds.features.get(image_column), datasets.Image):
        return 0
    checked, problems = 0, []
    for chunk in ds.data.column(image_column).chunks:  # the storage struct {bytes, path}, no decode
        if not pa.types.is_struct(chunk.type):
            return checked
        paths = chunk.field("path").to_pylist()
        embedded = chunk.field("bytes").is_valid().to_pylist()
        for path, has_bytes in zip(paths, embedded):
            if has_bytes or not path:
                continue
            checked += 1
            problem = _image_file_problem(path)
            if problem is not None:
                problems.append(f"{path} ({problem})")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"{what}: {len(problems)} unreadable image file(s): {shown}. Remove or replace them and rerun"
        )
    return checked


def _to_pil(value: Any) -> PILImage.Image:
    """Decode one image cell: PIL image, ``{"bytes", "path"}`` dict, bytes, file path, array or lists."""
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, str, os.PathLike)):
        image = PILImage.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
        image.load()  # decode now so a truncated file fails here, not later in convert()
        return image
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"cannot interpret an array of shape {array.shape} as an image")
    if array.dtype != np.uint8:
        # Floats in [0, 1] are scaled; anything else is clipped to the uint8 range.
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return PILImage.fromarray(array)


def _random_resized_crop(image: PILImage.Image, size: int) -> PILImage.Image:
    """RandomResizedCrop(scale=(0.05, 1), ratio=(3/4, 4/3)) + horizontal flip, as the reference
    training transform; uses torch's global RNG so ``transformers.set_seed`` governs it."""
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)  # fallback: whole image
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.05, 1.0))
        log_ratio = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3)))
        w = round((target * np.exp(log_ratio)) ** 0.5)
        h = round((target / np.exp(log_ratio)) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,)))
            top = int(torch.randint(0, height - h + 1, (1,)))
            box = (left, top, left + w, top + h)
            break
    image = image.resize((size, size), PILImage.Resampling.BILINEAR, box=box)
    if float(torch.rand(1)) < 0.5:
        image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    return image


def _eval_resize(image: PILImage.Image, size: int) -> PILImage.Image:
    """Reference eval transform: above 32 px, Resize(size*256/224, bicubic) + CenterCrop(size);
    small images (CIFAR-like) are resized straight to ``size x size``."""
    if size <= 32:
        return image.resize((size, size), PILImage.Resampling.BICUBIC)
    short = int(size * 256 / 224)
    width, height = image.size
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), PILImage.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass
class BatchTransform:
    """Picklable batched image transform (a class, not a closure, so DataLoader workers started with
    ``spawn`` can receive it). Build it with :func:`build_transform`."""

    image_size: int
    image_column: str
    mode: Literal["reference", "processor"]
    image_processor: Any
    augment: bool
    label_key: str

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images: list[PILImage.Image] = []
        row_ids = batch.get(ROW_ID)
        for k, cell in enumerate(batch[self.image_column]):
            try:
                image = _to_pil(cell).convert("RGB")  # greyscale / RGBA / palette -> RGB
            except Exception as err:
                where = f"row {row_ids[k]}" if row_ids is not None else f"batch position {k}"
                if isinstance(cell, dict) and cell.get("path"):
                    where += f", file {cell['path']}"
                raise ValueError(
                    f"could not decode image at {where} (column {self.image_column!r}): {err}"
                ) from err
            if self.augment:
                image = _random_resized_crop(image, self.image_size)
            elif self.mode == "reference":
                image = _eval_resize(image, self.image_size)
            images.append(image)
        if self.mode == "processor":
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()
        else:
            arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, H, W, 3)
            pixel_values = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
        out = {"pixel_values": pixel_values.contiguous()}
        if self.label_key in batch:
            out["labels"] = torch.as_tensor(batch[self.label_key], dtype=torch.int64)
        return out


def build_transform(
    image_size: int,
    *,
    image_column: str = "image",
    mode: Literal["reference", "processor"] = "reference",
    image_processor: Any = None,
    train: bool = False,
    augment: bool = False,
    label_key: str = LABELS,
) -> BatchTransform:
    """Batched transform for ``Dataset.with_transform``: ``{image_column: [...], "labels": [...]}`` ->
    ``{"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}`` (labels only if present).

    - ``"reference"`` (the paper's code): RGB, resize to ``image_size``, values in [0, 1], no
      normalisation. With ``train and augment``: random resized crop + horizontal flip.
    - ``"processor"``: RGB images (augmented the same way if asked) go through ``image_processor``
      (e.g. ``ViTImageProcessor``), which resizes and normalises.

    An undecodable image raises ``ValueError`` naming its ``row_id`` (split row) when available.
    """
    if mode not in ("reference", "processor"):
        raise ValueError(f"mode must be 'reference' or 'processor', got {mode!r}")
    if mode == "processor" and image_processor is None:
        raise ValueError("mode='processor' needs an image_processor")
    return BatchTransform(image_size, image_column, mode, image_processor, train and augment, label_key)


def with_image_transform(ds: datasets.Dataset, transform: Transform, image_column: str) -> datasets.Dataset:
    """``ds.with_transform(transform)`` with the ``Image`` column switched to ``decode=False`` (metadata
    only), so decoding happens in the transform, where a broken file is reported with its row id."""
    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds.with_transform(transform)


class DecodedImageCache:
    """Decoded RGB images (uint8 arrays (H, W, 3)) of one split, keyed by ``row_id``, up to ``max_bytes``.

    Decoding a PNG/JPEG again in every epoch and every evaluation is pure repetition; the decoded
    pixels are kept instead and the (possibly random) transform runs on them as before, so outputs are
    identical. Images beyond ``max_bytes`` are decoded every time. Share one cache between all
    transforms of a split (the decoded pixels do not depend on the transform).
    """

    def __init__(self, max_bytes: int = 2**30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._arrays)

    def __getstate__(self) -> dict[str, Any]:
        # A copy starts empty: DataLoader workers get their own cache instead of the pixels, and
        # `datasets` fingerprints a transform by pickling it (this keeps that instant).
        return {"max_bytes": self.max_bytes, "nbytes": 0, "_arrays": {}}

    def get(self, row_id: int) -> PILImage.Image | None:
        array = self._arrays.get(row_id)
        return None if array is None else PILImage.fromarray(array)

    def put(self, row_id: int, image: PILImage.Image) -> None:
        if row_id in self._arrays:
            return
        array = np.asarray(image, dtype=np.uint8)
        if self.nbytes + array.nbytes <= self.max_bytes:
            self._arrays[row_id] = array
            self.nbytes += array.nbytes


@dataclass
class RowIdTransform:
    """Wraps a batched transform: adds ``row_id`` (B,) to its output, so caches can key on the split row,
    and with ``decoded`` decodes each image once per run (the images handed to ``transform`` are RGB
    PIL images decoded earlier, which :class:`BatchTransform` treats exactly like the raw cells).

    ``decoded`` needs a transform that accepts PIL images in ``image_column`` (a :class:`BatchTransform`
    does). Each DataLoader worker holds its own copy, so the decode cache pays off with
    ``dataloader_num_workers=0`` (with workers decoding is parallel instead).
    """

    transform: Transform
    image_column: str
    decoded: DecodedImageCache | None = None

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        rows = [int(row) for row in batch[ROW_ID]]
        if self.decoded is not None:
            cells = list(batch[self.image_column])
            for k, row in enumerate(rows):
                image = self.decoded.get(row)
                if image is None:
                    try:
                        image = _to_pil(cells[k]).convert("RGB")
                    except Exception:  # noqa: BLE001 - the transform reports it with its row id
                        continue
                    self.decoded.put(row, image)
                cells[k] = image
            batch = {**batch, self.image_column: cells}
        out = dict(self.transform(batch))
        out[ROW_ID] = torch.as_tensor(rows, dtype=torch.int64)
        return out


def task_datasets(
    splits: ContinualSplits, task_id: int, transform_train: Transform, transform_eval: Transform
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) of one task with lazy transforms; Trainer needs ``remove_unused_columns=False``."""
    if not 0 <= task_id < splits.num_tasks:
        raise ValueError(f"task_id={task_id} is outside [0, {splits.num_tasks})")
    train = with_image_transform(splits.train[task_id], transform_train, splits.image_column)
    test = with_image_transform(splits.test[task_id], transform_eval, splits.image_column)
    return train, test


def seen_test_datasets(
    splits: ContinualSplits, upto_task: int, transform: Transform
) -> list[datasets.Dataset]:
    """Test sets of tasks ``0..upto_task`` (inclusive), each with the eval transform."""
    if not 0 <= upto_task < splits.num_tasks:
        raise ValueError(f"upto_task={upto_task} is outside [0, {splits.num_tasks})")
    return [with_image_transform(ds, transform, splits.image_column) for ds in splits.test[: upto_task + 1]]


def memory_subset(train_ds: datasets.Dataset, memory_samples: int | None, seed: int) -> datasets.Dataset:
    """Seeded random subset of ``memory_samples`` rows (PGP's representation memory); all rows if
    ``None`` or ``>= len``. The format/transform of ``train_ds`` is kept."""
    if memory_samples is None or memory_samples >= len(train_ds):
        return train_ds
    if memory_samples < 1:
        raise ValueError(f"memory_samples must be >= 1 or None, got {memory_samples}")
    rows = np.random.default_rng(seed).choice(len(train_ds), size=memory_samples, replace=False)
    return train_ds.select(np.sort(rows))


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows from a transformed dataset -> ``pixel_values`` (B, 3, H, W), ``labels`` (B,) and, when
    the rows carry it, ``row_id`` as a list of ints (host side, so a cache look-up needs no device read)."""
    out = {"pixel_values": torch.stack([torch.as_tensor(row["pixel_values"]) for row in batch])}
    if all("labels" in row for row in batch):
        out["labels"] = torch.as_tensor([int(row["labels"]) for row in batch], dtype=torch.int64)
    if all(ROW_ID in row for row in batch):  # from RowIdTransform: kept on the host for cache look-ups
        out[ROW_ID] = [int(row[ROW_ID]) for row in batch]
    return out


def load_demo_dataset() -> tuple[datasets.Dataset, datasets.Dataset]:
    """The shipped offline demo data: a balanced Fashion-MNIST subset (Zalando SE, MIT; see
    ``demo_data/README.md``). Returns in-memory (train, test) with ``image`` (PNG, 28x28 greyscale)
    and ``label`` (``ClassLabel``, 10 classes) columns: 3,000 train and 1,000 test rows."""
    resource = resources.files("pgp_peft").joinpath("demo_data", DEMO_FILE)
    with resources.as_file(resource) as path, np.load(path) as data:
        names = [str(n) for n in data["class_names"]]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        out = []
        for split in ("train", "test"):
            images = [PILImage.fromarray(x) for x in data[f"x_{split}"]]
            out.append(
                datasets.Dataset.from_dict(
                    {"image": images, "label": data[f"y_{split}"].tolist()}, features=features, split=split
                )
            )
    return out[0], out[1]
