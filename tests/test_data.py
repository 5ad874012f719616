"""Tests for pgp_peft.data on tiny in-memory datasets (and one imagefolder directory)."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pgp_peft.data import (
    ContinualSplits,
    build_transform,
    collate,
    load_demo_dataset,
    load_image_dataset,
    make_class_incremental_splits,
    memory_subset,
    seen_test_datasets,
    task_datasets,
)


def make_dataset(num_classes: int, per_class: int, size: int = 6, mode: str = "RGB") -> datasets.Dataset:
    """Tiny image dataset: rows cycle through the classes; pixel value encodes the class."""
    labels = [i % num_classes for i in range(num_classes * per_class)]
    images = [
        Image.new(mode, (size, size), color=10 * label if mode == "L" else (10 * label, 0, 0))
        for label in labels
    ]
    names = [f"class_{c}_name" for c in range(num_classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def original_labels(ds: datasets.Dataset) -> list[int]:
    return ds.with_format("arrow")["label"].to_pylist()


def remapped_labels(ds: datasets.Dataset) -> list[int]:
    return ds.with_format("arrow")["labels"].to_pylist()


@pytest.fixture(scope="module")
def six_class() -> tuple[datasets.Dataset, datasets.Dataset]:
    return make_dataset(6, per_class=4), make_dataset(6, per_class=2)


def test_natural_order_splits(six_class) -> None:
    train, test = six_class
    splits = make_class_incremental_splits(train, test, num_tasks=3, dataset_id="toy")
    assert splits.class_order == [0, 1, 2, 3, 4, 5]
    assert splits.task_classes == [[0, 1], [2, 3], [4, 5]]
    assert (splits.num_tasks, splits.num_classes) == (3, 6)
    assert [splits.classes_seen(t) for t in range(3)] == [2, 4, 6]
    assert [splits.task_of_label(c) for c in range(6)] == [0, 0, 1, 1, 2, 2]
    assert splits.class_names[0] == "class 0 name"
    seen_rows: set[int] = set()
    for t in range(3):
        assert len(splits.train[t]) == 8 and len(splits.test[t]) == 4
        for ds in (splits.train[t], splits.test[t]):
            assert sorted(set(remapped_labels(ds))) == splits.task_classes[t]
            assert sorted(set(original_labels(ds))) == splits.class_order[2 * t : 2 * t + 2]
        rows = set(splits.train[t]["row_id"])
        assert not rows & seen_rows  # no row in two tasks
        seen_rows |= rows
    assert seen_rows == set(range(len(train)))
    with pytest.raises(ValueError, match="outside"):
        splits.task_of_label(6)


def test_manifest_content(six_class) -> None:
    splits = make_class_incremental_splits(*six_class, num_tasks=2, class_order_seed=3, dataset_id="toy")
    manifest = json.loads(json.dumps(splits.to_manifest()))
    assert manifest["dataset"] == "toy" and manifest["class_order_seed"] == 3
    assert manifest["class_order"] == splits.class_order
    assert manifest["task_classes"] == [[0, 1, 2], [3, 4, 5]]
    assert manifest["train_sizes"] == [12, 12] and manifest["test_sizes"] == [6, 6]
    assert manifest["class_names"][0] == f"class {splits.class_order[0]} name"


def test_seeded_permutation_is_reproducible_and_differs() -> None:
    train, test = make_dataset(10, 2), make_dataset(10, 1)
    a = make_class_incremental_splits(train, test, num_tasks=5, class_order_seed=0)
    b = make_class_incremental_splits(train, test, num_tasks=5, class_order_seed=0)
    c = make_class_incremental_splits(train, test, num_tasks=5, class_order_seed=1)
    assert a.class_order == b.class_order == np.random.default_rng(0).permutation(10).tolist()
    assert a.class_order != list(range(10)) and a.class_order != c.class_order
    # Remapped label = position of the original label in the class order, in train and test alike.
    for ds in [*a.train, *a.test]:
        assert remapped_labels(ds) == [a.class_order.index(x) for x in original_labels(ds)]


def test_explicit_subset_order_and_classes_per_task(six_class) -> None:
    splits = make_class_incremental_splits(*six_class, num_tasks=2, class_order=[5, 1, 3, 0])
    assert splits.class_order == [5, 1, 3, 0]
    assert sorted(set(original_labels(splits.train[0]))) == [1, 5]
    assert remapped_labels(splits.test[1]).count(2) == 2
    first = make_class_incremental_splits(*six_class, num_tasks=2, classes_per_task=2)
    assert first.class_order == [0, 1, 2, 3] and first.task_classes == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="needs 8 classes"):
        make_class_incremental_splits(*six_class, num_tasks=4, classes_per_task=2)
    with pytest.raises(ValueError, match="absent"):
        make_class_incremental_splits(*six_class, num_tasks=1, class_order=[0, 9])


def test_uneven_and_too_few_classes_are_errors() -> None:
    train, test = make_dataset(7, 2), make_dataset(7, 1)
    with pytest.raises(ValueError, match=r"7 classes do not divide evenly into 3 tasks.*classes_per_task=2"):
        make_class_incremental_splits(train, test, num_tasks=3)
    with pytest.raises(ValueError, match="fewer classes than tasks"):
        make_class_incremental_splits(train, test, num_tasks=8)


def test_missing_column_lists_available_columns(six_class) -> None:
    with pytest.raises(ValueError, match=r"no column\(s\) \['img'\].*\['image', 'label'\]"):
        make_class_incremental_splits(*six_class, num_tasks=2, image_column="img")
    with pytest.raises(ValueError, match=r"\['fine_label'\].*available columns"):
        load_image_dataset(
            datasets.DatasetDict({"train": six_class[0], "test": six_class[1]}), label_column="fine_label"
        )


def test_missing_split_lists_available_splits(six_class) -> None:
    with pytest.raises(ValueError, match=r"'valid' not found; available splits: \['train', 'test'\]"):
        load_image_dataset(
            datasets.DatasetDict({"train": six_class[0], "test": six_class[1]}), test_split="valid"
        )


def test_holdout_is_stratified_seeded_and_saved(tmp_path) -> None:
    # ImageNet-R on the Hub has a single 'test' split: the train set is carved out of it.
    pool = make_dataset(3, per_class=10)
    manifest = tmp_path / "holdout.json"
    source = datasets.DatasetDict({"test": pool})
    train, test = load_image_dataset(source, holdout_fraction=0.2, holdout_seed=7, manifest_path=manifest)
    assert (len(train), len(test)) == (24, 6)
    assert [original_labels(test).count(c) for c in range(3)] == [2, 2, 2]
    assert [original_labels(train).count(c) for c in range(3)] == [8, 8, 8]
    saved = json.loads(manifest.read_text())
    assert saved["source_split"] == "test" and saved["holdout_seed"] == 7
    assert sorted(saved["train_indices"] + saved["test_indices"]) == list(range(30))
    again = load_image_dataset(source, holdout_fraction=0.2, holdout_seed=7)[1]
    other = load_image_dataset(pool, holdout_fraction=0.2, holdout_seed=8)[1]
    assert again["image"] == test["image"] and other["image"] != test["image"]
    with pytest.raises(ValueError, match="available splits"):
        load_image_dataset(datasets.DatasetDict({"a": pool, "b": pool}), holdout_fraction=0.2)


def test_imagefolder_directory(tmp_path) -> None:
    for split, count in (("train", 3), ("test", 2)):
        for name, color in (("golden_retriever", (200, 150, 0)), ("tabby_cat", (90, 90, 90))):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (9, 7), color).save(folder / f"{k}.png")
    train, test = load_image_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert (len(train), len(test)) == (6, 4)
    splits = make_class_incremental_splits(train, test, num_tasks=2)
    assert splits.class_names == ["golden retriever", "tabby cat"]
    train_ds, test_ds = task_datasets(splits, 1, build_transform(8, image_column="image"), build_transform(8))
    batch = test_ds[:2]
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["labels"].tolist() == [1, 1]
    torch.testing.assert_close(batch["pixel_values"][:, :, 4, 4], torch.full((2, 3), 90 / 255))


def test_transform_channels_size_range_no_normalisation() -> None:
    transform = build_transform(12, image_column="image")
    images = [
        Image.new("L", (5, 7), 128),
        Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
        Image.new("P", (4, 4), 0),
        np.full((6, 6), 255, dtype=np.uint8),  # numpy greyscale
        np.zeros((3, 5, 5), dtype=np.float32).tolist(),  # nested lists, CHW floats
    ]
    out = transform({"image": images, "labels": [0, 1, 2, 3, 4]})
    pixels = out["pixel_values"]
    assert pixels.shape == (5, 3, 12, 12) and pixels.dtype == torch.float32
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [0, 1, 2, 3, 4]
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    torch.testing.assert_close(pixels[0], torch.full((3, 12, 12), 128 / 255))  # no mean/std normalisation
    assert pixels[1, 0].min() == 1.0 and pixels[1, 1:].max() == 0.0  # RGBA -> RGB keeps colour
    assert pixels[3].min() == 1.0 and pixels[4].max() == 0.0
    # Large images: reference eval resize (shorter side * 256/224) + centre crop.
    assert transform({"image": [Image.new("RGB", (90, 60))]})["pixel_values"].shape == (1, 3, 12, 12)
    big = build_transform(48)({"image": [Image.new("RGB", (90, 60))]})["pixel_values"]
    assert big.shape == (1, 3, 48, 48) and "labels" not in build_transform(48)(
        {"image": [Image.new("L", (3, 3))]}
    )


def test_train_augmentation_is_seeded() -> None:
    gradient = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (25, 1)))
    transform = build_transform(16, train=True, augment=True)
    torch.manual_seed(0)
    first = transform({"image": [gradient] * 4})["pixel_values"]
    torch.manual_seed(0)
    second = transform({"image": [gradient] * 4})["pixel_values"]
    assert first.shape == (4, 3, 16, 16)
    torch.testing.assert_close(first, second)
    assert not torch.equal(first[0], first[1]) or not torch.equal(first[1], first[2])


def test_processor_mode() -> None:
    from transformers import ViTImageProcessor

    processor_cls = getattr(__import__("transformers"), "ViTImageProcessorPil", ViTImageProcessor)
    processor = processor_cls(size={"height": 10, "width": 10})  # mean 0.5, std 0.5 -> [-1, 1]
    out = build_transform(10, mode="processor", image_processor=processor)(
        {"image": [Image.new("L", (4, 6), 0)], "labels": [3]}
    )
    assert out["pixel_values"].shape == (1, 3, 10, 10)
    assert float(out["pixel_values"].max()) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="image_processor"):
        build_transform(10, mode="processor")


def test_corrupt_image_names_its_row() -> None:
    good = io.BytesIO()
    Image.new("RGB", (4, 4)).save(good, format="PNG")
    cells = [{"bytes": good.getvalue(), "path": None}] * 6
    cells[3] = {"bytes": b"definitely not a png", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1] * 3}, features=features)
    splits = make_class_incremental_splits(ds, ds, num_tasks=2)
    transform = build_transform(4)
    train_ds, _ = task_datasets(splits, 1, transform, transform)  # rows 1, 3, 5
    assert train_ds[0]["pixel_values"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match=r"could not decode image at row 3 "):
        train_ds[:3]
    with pytest.raises(ValueError, match="batch position 0"):
        transform({"image": [b"garbage"]})


def test_seen_test_datasets_and_collate(six_class) -> None:
    splits = make_class_incremental_splits(*six_class, num_tasks=3)
    seen = seen_test_datasets(splits, 1, build_transform(4))
    assert len(seen) == 2
    batch = collate([seen[1][0], seen[1][1], seen[0][0]])
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["labels"].tolist() == [2, 3, 0]
    # The undecoded view is internal: the splits themselves still decode to PIL.
    assert isinstance(splits.test[0][0]["image"], Image.Image)
    with pytest.raises(ValueError, match="outside"):
        seen_test_datasets(splits, 3, build_transform(4))


def test_memory_subset(six_class) -> None:
    ds = six_class[0]
    subset = memory_subset(ds, 5, seed=0)
    assert len(subset) == 5
    assert memory_subset(ds, 5, seed=0)["image"] == subset["image"]
    picks = {
        tuple(np.asarray(memory_subset(ds.add_column("i", list(range(24))), 5, seed=s)["i"]))
        for s in range(4)
    }
    assert len(picks) > 1
    assert memory_subset(ds, None, seed=0) is ds and memory_subset(ds, 100, seed=0) is ds


def test_load_demo_dataset() -> None:
    train, test = load_demo_dataset()
    assert (len(train), len(test)) == (3000, 1000)
    names = train.features["label"].names
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert np.bincount(original_labels(train)).tolist() == [300] * 10
    assert np.bincount(original_labels(test)).tolist() == [100] * 10
    image = train[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    splits = make_class_incremental_splits(train, test, num_tasks=5)
    assert isinstance(splits, ContinualSplits) and splits.to_manifest()["train_sizes"] == [600] * 5


def test_transform_is_picklable_for_spawned_workers() -> None:
    import pickle

    transform = pickle.loads(pickle.dumps(build_transform(5, train=True, augment=True)))
    assert transform({"image": [Image.new("L", (3, 3))]})["pixel_values"].shape == (1, 3, 5, 5)
