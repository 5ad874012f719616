"""Tiny continual-learning setups shared by the trainer tests and their subprocess scripts.

A 5-layer, 32-wide random ViT on 16x16 images (4x4 patches), an in-memory `datasets.Dataset` of
learnable random images (every class has its own colour pattern per patch, plus noise), and the
`ContinualTrainer` with CPU-friendly `TrainingArguments`. Importable from tests (which put this
folder on `sys.path`) and from the scripts next to it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTModel

from pgp_peft.config import PromptGradientProjectionConfig as Config
from pgp_peft.data import ContinualSplits, build_transform, make_class_incremental_splits
from pgp_peft.model import PGPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny assets
from tiny_assets import TINY_VIT  # noqa: E402

IMAGE_SIZE = 16


def tiny_backbone(seed: int = 0, attn: str = "sdpa") -> ViTModel:
    config = ViTConfig(**TINY_VIT, attn_implementation=attn)
    torch.manual_seed(seed)
    return ViTModel(config, add_pooling_layer=False).eval()


def make_image_dataset(
    num_classes: int, per_class: int, seed: int, noise: float = 0.12, proto_seed: int = 1234
) -> datasets.Dataset:
    """`image` (PNG, 16x16 RGB) and `label` (ClassLabel): class c = its 4x4 colour pattern + noise.

    The prototypes depend only on the class (`proto_seed`), the noise on `seed`, so train and test
    sets drawn with different seeds share the classes."""
    protos = np.random.default_rng(proto_seed).uniform(0.1, 0.9, (num_classes, 4, 4, 3))
    protos = protos.repeat(4, axis=1).repeat(4, axis=2)  # one colour per 4x4 patch
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(num_classes):
        for _ in range(per_class):
            array = np.clip(protos[c] + rng.normal(0.0, noise, protos[c].shape), 0.0, 1.0)
            images.append(Image.fromarray((array * 255).round().astype(np.uint8)))
            labels.append(c)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def make_splits(
    num_tasks: int = 3, classes_per_task: int = 2, train_per_class: int = 12, test_per_class: int = 5
) -> ContinualSplits:
    num_classes = num_tasks * classes_per_task
    train = make_image_dataset(num_classes, train_per_class, seed=1)
    test = make_image_dataset(num_classes, test_per_class, seed=2)
    return make_class_incremental_splits(train, test, num_tasks=num_tasks)


def make_config(method: str, num_classes: int, **overrides: Any) -> Config:
    if method == "l2p":
        values: dict[str, Any] = dict(num_classes=num_classes, pool_size=4, top_k=2, prompt_length=3)
        values.update(overrides)
        return Config.l2p(**values)
    if method == "lora":
        values = dict(num_classes=num_classes, r=4, lora_alpha=4.0, target_modules=["q_proj", "v_proj"])
        values.update(overrides)
        return Config.lora(**values)
    values = dict(num_classes=num_classes, pool_size=4, g_prompt_length=2, e_prompt_length=3)
    values.update(overrides)
    return Config.dualprompt(**values)


def make_model(method: str, num_classes: int, seed: int = 0, vit_seed: int = 0, **overrides: Any) -> PGPModel:
    config = make_config(method, num_classes, **overrides)
    backbone = tiny_backbone(vit_seed)
    torch.manual_seed(seed)
    return PGPModel(config, base_model=backbone)


def training_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=42,
        logging_steps=1000,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(
    model: PGPModel,
    splits: ContinualSplits,
    output_dir: str,
    *,
    callbacks: list[TrainerCallback] | None = None,
    online: bool = False,
    **arg_overrides: Any,
):
    from pgp_peft.trainer import ContinualTrainer

    return ContinualTrainer(
        model,
        training_args(output_dir, **arg_overrides),
        splits=splits,
        train_transform=build_transform(IMAGE_SIZE),
        eval_transform=build_transform(IMAGE_SIZE),
        online=online,
        callbacks=callbacks,
    )


def eval_pixels(dataset: datasets.Dataset) -> torch.Tensor:
    """All images of a task split as (N, 3, 16, 16) with the eval transform."""
    transform = build_transform(IMAGE_SIZE)
    return transform({"image": list(dataset["image"]), "labels": list(dataset["labels"])})["pixel_values"]


# ------------------------------------------------------------------ leak measurement
def protected_views(model: PGPModel) -> list[tuple[str, torch.Tensor, list[str]]]:
    """(label, the protected slice of the live parameter, space names) for every protected slice."""
    out = []
    for number, (parameter, index, names) in enumerate(model.protected_slices()):
        label = f"{number}:{'/'.join(names) if len(names) == 1 else names[0].rsplit('_h', 1)[0]}"
        out.append((label, parameter.detach()[index], names))
    return out


def memory_bases(model: PGPModel) -> dict[str, torch.Tensor]:
    """A copy of every space's current basis (D, r)."""
    return {name: model.memory.basis(name).clone() for name in model.memory.names}


def relative_leaks(
    model: PGPModel,
    before: list[torch.Tensor],
    after: list[torch.Tensor],
    bases: dict[str, torch.Tensor],
) -> dict[str, float]:
    """||Δ U|| / ||Δ|| per (protected slice, space), with Δ = after - before in float64 and U the
    basis the projection used (`bases`, taken when the task started: the memory grows at its end).

    Multi-head slices are split row-major into heads (head h <-> names[h]). Spaces whose basis is
    empty, or whose Δ is zero, are left out."""
    leaks: dict[str, float] = {}
    for (label, _, names), old, new in zip(protected_views(model), before, after):
        delta = new.to(torch.float64) - old.to(torch.float64)
        heads = delta.reshape(*delta.shape[:-1], len(names), delta.shape[-1] // len(names))
        for h, name in enumerate(names):
            basis = bases[name].to(torch.float64)
            part = heads[..., h, :].reshape(-1, heads.shape[-1])
            norm = float(part.norm())
            if basis.shape[1] == 0 or norm == 0.0:
                continue
            leaks[f"{label}:{name}"] = float((part @ basis).norm()) / norm
    return leaks


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


class TaskSnapshots(TrainerCallback):
    """Protected slices and memory bases at the start and end of every task's `train()`."""

    def __init__(self) -> None:
        self.trainer = None
        self.bases: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def _slices(self) -> list[torch.Tensor]:
        return [view.clone() for _, view, _ in protected_views(self.trainer.model)]

    def on_train_begin(self, args, state, control, **kwargs):
        task = self.trainer.current_task
        self.bases[task] = memory_bases(self.trainer.model)
        self.before[task] = self._slices()

    def on_train_end(self, args, state, control, **kwargs):
        self.after[self.trainer.current_task] = self._slices()
