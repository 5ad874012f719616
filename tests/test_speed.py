"""The speed options change no result: query cache, decode cache, host-side task ids, bf16 autocast on CPU."""

from __future__ import annotations

import gc
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import tiny_cl  # noqa: E402
from tiny_assets import tiny_png  # noqa: E402

from pgp_peft import data as data_module  # noqa: E402
from pgp_peft import trainer as pgp_trainer  # noqa: E402
from pgp_peft.arguments import ContinualTrainingArguments  # noqa: E402
from pgp_peft.callbacks import ContinualCallback  # noqa: E402
from pgp_peft.data import (  # noqa: E402
    DecodedImageCache,
    RowIdTransform,
    build_transform,
    collate,
    with_image_transform,
)
from pgp_peft.methods.prompt_selection import task_slots  # noqa: E402
from pgp_peft.query_cache import QueryCache  # noqa: E402
from pgp_peft.runner import trainer_speed_options  # noqa: E402
from pgp_peft.trainer import ContinualTrainer  # noqa: E402

OFF = {"eval_query_cache": False, "train_query_cache": False, "decode_cache": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------- QueryCache
def test_query_cache_serves_stored_rows_and_computes_missing_batches():
    cache = QueryCache(hidden_size=3)
    calls = []

    def compute(pixels):
        calls.append(pixels.shape[0])
        return pixels[:, :3] * 2

    pixels = torch.arange(20.0).reshape(4, 5)
    first = cache.get_or_compute("test", [7, 2, 9, 0], pixels, compute)
    again = cache.get_or_compute("test", [0, 9], pixels[[3, 2]], compute)
    assert calls == [4] and torch.equal(again, first[[3, 2]])
    assert cache.lookup("test", [0, 1]) is None  # row 1 never stored
    assert cache.lookup("train", [0]) is None  # namespaces are separate
    cache.get_or_compute("test", [0, 1], pixels[:2], compute)  # a partial hit computes the whole batch
    assert calls == [4, 2] and (cache.hits, cache.misses) == (2, 6)
    cache.store("test", [40], torch.ones(1, 3))  # grows past the first capacity
    assert torch.equal(cache.lookup("test", [40, 7]), torch.tensor([[1.0, 1, 1], [0, 2, 4]]))
    assert cache.nbytes == 41 * 3 * 4


def test_query_cache_respects_its_byte_cap():
    cache = QueryCache(hidden_size=4, max_bytes=10 * 4 * 4)
    cache.store("test", [9], torch.ones(1, 4))
    cache.store("test", [10], torch.ones(1, 4))  # would need 20 rows: not stored
    assert cache.lookup("test", [9]) is not None and cache.lookup("test", [10]) is None
    assert cache.nbytes <= cache.max_bytes
    near_cap = QueryCache(hidden_size=4, max_bytes=12 * 4 * 4)
    for row in (3, 7, 11):  # capacities 4, 8, then 12 (doubling to 16 would pass the cap)
        near_cap.store("test", [row], torch.ones(1, 4))
    assert near_cap.lookup("test", [3, 7, 11]) is not None and near_cap.nbytes == near_cap.max_bytes


# ---------------------------------------------------------------------------------- model hook
@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_precomputed_query_gives_the_same_outputs_bitwise(method, pixel_values):
    model = tiny_cl.make_model(method, num_classes=4)
    model.register_task_classes(0, [0, 1])
    query = model.backbone.query(pixel_values)
    for training in (False, True):
        model.train(training)
        plain = model(pixel_values, labels=torch.tensor([0, 1, 0, 1]), task_id=0)
        cached = model(pixel_values, labels=torch.tensor([0, 1, 0, 1]), task_id=0, query=query)
        assert torch.equal(plain.logits, cached.logits) and torch.equal(plain.loss, cached.loss)
        assert torch.equal(plain.prompt_ids, cached.prompt_ids)
    with pytest.raises(ValueError, match=r"query must be \(batch, hidden_size\)"):
        model(pixel_values, query=query[:2])


def test_task_slot_from_an_int_equals_the_tensor_path(pixel_values):
    model = tiny_cl.make_model("dualprompt", num_classes=4)
    model.train()
    as_int = task_slots(model.method, 1, 4, pixel_values.device)
    as_tensor = task_slots(model.method, torch.full((4,), 1), 4, pixel_values.device)
    assert torch.equal(as_int, as_tensor) and as_int.tolist() == [[1]] * 4
    assert task_slots(model.method, model.config.pool_size, 4, pixel_values.device) is None  # beyond the pool


# ---------------------------------------------------------------------------------- data path
def _png_rows(num: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"image": Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)), "label": i % 2}
        for i in range(num)
    ]


@pytest.mark.parametrize("augment", [False, True])
def test_decode_cache_gives_identical_pixels_and_decodes_once(augment, monkeypatch):
    import datasets

    rows = _png_rows(6)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    table = datasets.Dataset.from_dict(
        {"image": [r["image"] for r in rows], "label": [r["label"] for r in rows]}, features=features
    )
    splits = data_module.make_class_incremental_splits(table, table, num_tasks=1)
    transform = build_transform(8, train=True, augment=augment)
    plain = with_image_transform(splits.train[0], transform, "image")
    decoded = DecodedImageCache()
    cached = with_image_transform(splits.train[0], RowIdTransform(transform, "image", decoded), "image")
    decodes = []
    original = data_module._to_pil

    def counting(cell):
        if not isinstance(cell, Image.Image):  # a decoded image passes through untouched
            decodes.append(1)
        return original(cell)

    monkeypatch.setattr(data_module, "_to_pil", counting)
    for _ in range(2):  # two epochs, same seed: same augmentation
        torch.manual_seed(0)
        want = plain[:]["pixel_values"]
        torch.manual_seed(0)
        got = cached[:]
        assert torch.equal(want, got["pixel_values"])
        assert got["row_id"].tolist() == list(range(6))
    assert len(decodes) == 6 * 2 + 6  # the plain transform twice, the cached one once
    assert len(decoded) == 6 and decoded.nbytes == 6 * 9 * 11 * 3
    assert len(pickle.loads(pickle.dumps(decoded))) == 0  # workers / fingerprints get an empty copy
    batch = collate([cached[0], cached[3]])
    assert batch["row_id"] == [0, 3] and batch["pixel_values"].shape == (2, 3, 8, 8)


def test_decode_cache_still_names_an_undecodable_row():
    transform = RowIdTransform(build_transform(4), "image", DecodedImageCache())
    with pytest.raises(ValueError, match="could not decode image at row 5"):
        transform({"image": [b"not an image"], "row_id": [5]})


# ---------------------------------------------------------------------------------- whole runs
def _run(method: str, tmp_path, **options):
    splits = tiny_cl.make_splits(num_tasks=2)
    model = tiny_cl.make_model(method, num_classes=4)
    transform = build_transform(tiny_cl.IMAGE_SIZE)
    trainer = ContinualTrainer(
        model,
        tiny_cl.training_args(str(tmp_path)),
        splits=splits,
        train_transform=transform,
        eval_transform=transform,
        **options,
    )
    calls = []
    original = model.backbone.query
    model.backbone.query = lambda pixels: calls.append(pixels.shape[0]) or original(pixels)
    result = trainer.train_continual()
    return result, trainer, sum(calls), splits


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_caches_leave_the_accuracy_matrices_bitwise_unchanged(method, tmp_path):
    plain, plain_trainer, plain_queries, splits = _run(method, tmp_path / "off", **OFF)
    cached, trainer, cached_queries, _ = _run(method, tmp_path / "on")
    plain_bases, cached_bases = plain_trainer.model.memory.state_dict(), trainer.model.memory.state_dict()
    assert all(
        torch.equal(plain_bases[k], cached_bases[k]) for k in plain_bases
    )  # L2P: memory from the cache
    np.testing.assert_array_equal(plain.accuracy.values, cached.accuracy.values)
    np.testing.assert_array_equal(plain.task_il_accuracy.values, cached.task_il_accuracy.values)
    train_rows = sum(len(d) for d in splits.train)
    test_rows = sum(len(d) for d in splits.test)
    # one query pass per training image (2 epochs) and per test image (evaluated after every later task)
    assert cached_queries == train_rows + test_rows
    assert plain_queries == 2 * train_rows + sum((2 - t) * len(d) for t, d in enumerate(splits.test))
    assert trainer.query_cache.nbytes > 0 and set(plain.seconds) == {"train", "memory", "evaluation"}


def test_augmented_training_is_not_query_cached(tmp_path):
    splits = tiny_cl.make_splits(num_tasks=2)
    model = tiny_cl.make_model("l2p", num_classes=4)
    trainer = ContinualTrainer(
        model,
        tiny_cl.training_args(str(tmp_path)),
        splits=splits,
        train_transform=build_transform(tiny_cl.IMAGE_SIZE, train=True, augment=True),
        eval_transform=build_transform(tiny_cl.IMAGE_SIZE),
    )
    assert trainer.train_query_cache is False and trainer.eval_query_cache is True
    inputs = trainer._training_inputs(
        {
            "pixel_values": torch.zeros(2, 3, 16, 16),
            "task_id": torch.zeros(2, dtype=torch.long),
            "row_id": [0, 1],
        }
    )
    assert "query" not in inputs and "row_id" not in inputs and inputs["task_id"] == 0
    with pytest.raises(ValueError, match="train_query_cache=True needs an unaugmented training transform"):
        ContinualTrainer(
            model,
            tiny_cl.training_args(str(tmp_path)),
            splits=splits,
            train_transform=build_transform(tiny_cl.IMAGE_SIZE, train=True, augment=True),
            train_query_cache=True,
        )


def test_bf16_autocast_on_cpu_with_the_caches(tmp_path):
    """The CUDA default path (bf16 autocast) exercised on the CPU: caches on vs off give the same
    matrices, every cached query was computed in the precision of the uncached pass it replaces, the
    adapter stays float32."""
    splits = tiny_cl.make_splits(num_tasks=2)
    results = []
    for options in (OFF, {}):
        model = tiny_cl.make_model("l2p", num_classes=4)
        trainer = ContinualTrainer(
            model,
            tiny_cl.training_args(str(tmp_path / str(len(results))), bf16=True),
            splits=splits,
            train_transform=build_transform(tiny_cl.IMAGE_SIZE),
            eval_transform=build_transform(tiny_cl.IMAGE_SIZE),
            **options,
        )
        results.append(trainer.train_continual())
        assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Training queries are cached as the autocast-wrapped training forward computes them; evaluation
    # runs without autocast, and so do its cached queries.
    train_pixels = tiny_cl.eval_pixels(splits.train[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.backbone.query(train_pixels)
    cached = trainer.query_cache.lookup("train", splits.train[1]["row_id"])
    assert torch.equal(cached, under_autocast) and not torch.equal(cached, model.backbone.query(train_pixels))
    test_pixels = tiny_cl.eval_pixels(splits.test[0])
    cached = trainer.query_cache.lookup("test", splits.test[0]["row_id"])
    assert torch.equal(cached, model.backbone.query(test_pixels))
    np.testing.assert_array_equal(results[0].accuracy.values, results[1].accuracy.values)


def test_recipe_speed_defaults(tmp_path):
    """bf16 unset: autocast exactly on a bf16-capable CUDA device; an explicit value wins."""
    args = ContinualTrainingArguments(output_dir=str(tmp_path))
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert ContinualTrainingArguments(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    assert ContinualTrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16 is True
    options = trainer_speed_options(args)
    assert options == {
        "eval_query_cache": True,
        "train_query_cache": None,
        "decode_cache": True,
        "compile_backbone": False,
    }


# ---------------------------------------------------------------------------------- run bookkeeping
class _Recorder(ContinualCallback):
    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.freeze_counts: list[int] = []
        self.plots: list[bool] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.freeze_counts.append(gc.get_freeze_count())

    def on_task_end(self, args, state, control, *, trainer, task_id, result, **kwargs):
        self.plots.append((self.output_dir / "accuracy_matrix.png").is_file())


def test_training_freezes_older_objects_for_the_gc_and_plots_render_once(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(
        pgp_trainer, "plot_accuracy_matrix", lambda m, p: drawn.append(len(m)) or tiny_png(m, p)
    )
    monkeypatch.setattr(pgp_trainer, "plot_accuracy_curves", tiny_png)
    splits = tiny_cl.make_splits(num_tasks=2)
    alone = tiny_cl.make_trainer(tiny_cl.make_model("l2p", num_classes=4), splits, str(tmp_path / "a"))
    alone.train_continual()
    assert drawn == [2]  # nothing reads them per task: drawn once, after the last task
    assert gc.get_freeze_count() == 0  # unfrozen after every task
    recorder = _Recorder(tmp_path / "b")
    watched = tiny_cl.make_trainer(
        tiny_cl.make_model("l2p", num_classes=4), splits, str(tmp_path / "b"), callbacks=[recorder]
    )
    watched.train_continual()
    assert recorder.plots == [True, True] and drawn == [2, 2, 2]  # a task-end callback may publish them
    assert len(recorder.freeze_counts) == 2 and min(recorder.freeze_counts) > 0 and gc.get_freeze_count() == 0
