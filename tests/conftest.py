"""Shared tiny-model fixtures: a 5-layer, 32-wide ViT on 16x16 images (16 patches), CPU, fixed seeds."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_assets import TINY_VIT, TinyAssets, build_assets, tiny_png  # TINY_VIT: the one tiny test ViT
from transformers import ViTConfig, ViTModel

# Tiny models are dominated by per-op overhead: one intra-op thread is several times faster than two
# on a shared 2-core machine, and results do not depend on it.
torch.set_num_threads(1)
# Recipe names resolve in the repository's recipes/ folder, as recipes/train_cl.py sets it up.
os.environ.setdefault("PGP_RECIPES_DIR", str(Path(__file__).resolve().parents[1] / "recipes"))


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    """A fresh tiny `ViTConfig` (sdpa attention)."""
    return ViTConfig(**TINY_VIT)


@pytest.fixture
def tiny_vit() -> Callable[..., ViTModel]:
    """Factory: `tiny_vit(seed=0, attn="sdpa", **config_overrides)` -> a fresh random ViTModel in eval mode.

    The same seed and overrides always give the same weights, so two calls build identical, independent
    backbones (one to wrap, one to compare against).
    """

    def make(seed: int = 0, attn: str = "sdpa", **overrides) -> ViTModel:
        config = ViTConfig(**{**TINY_VIT, **overrides}, attn_implementation=attn)
        torch.manual_seed(seed)
        return ViTModel(config, add_pooling_layer=False).eval()

    return make


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """(4, 3, 16, 16) images in [0, 1] from a fixed generator."""
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(4, 3, 16, 16, generator=generator)


@pytest.fixture
def restore_logging():
    """`main()` configures logging; keep the root logger as it was for the other tests."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyAssets:
    """The tiny ViT, tiny CLIP and 20-class imagefolder (written once per session, tiny_assets.py)."""
    return build_assets(tmp_path_factory)


@pytest.fixture
def fast_plots(monkeypatch):
    """The trainer's PNG plots, replaced by a 2x2 PNG (real plots: the CLI demo test)."""
    import pgp_peft.trainer

    monkeypatch.setattr(pgp_peft.trainer, "plot_accuracy_matrix", tiny_png)
    monkeypatch.setattr(pgp_peft.trainer, "plot_accuracy_curves", tiny_png)
