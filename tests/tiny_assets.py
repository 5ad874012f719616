"""Tiny, offline stand-ins for the checkpoints and datasets the recipes name (no downloads).

* `save_tiny_vit(folder)`: a 5-layer, 32-wide ViT on 16x16 images (the conftest's TINY_VIT), saved with
  `save_pretrained` so `AutoConfig`/`ViTModel.from_pretrained` load it like a Hub checkpoint.
* `save_tiny_clip(folder)`: a tiny `CLIPModel` + its tokenizer (a character-level CLIP BPE vocabulary, as
  in test_clip.py) + a `CLIPImageProcessor` (16 px), so `AutoTokenizer`, `load_clip_tokenizer` and
  `AutoImageProcessor` (`preprocessing: processor`) load it from the folder.
* `make_image_folder(root)`: an `imagefolder` dataset `train/<class>/*.png`, `test/<class>/*.png` with 20
  readable class names (20 divides 5, 10 and 20 tasks). Each class has its own colour, so the task is
  learnable but the images are tiny.
* `tiny_recipe_overrides(recipe, ...)`: the overrides that point a recipe at these assets while keeping
  every paper-facing value of the recipe that fits a 5-layer model.

Import these helpers from test modules; pytest fixtures wrapping them live in the test files.
"""

from __future__ import annotations

import json
import string
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=5,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
)

# Readable, lowercase, single words: imagefolder sorts them, CLIP builds "name." prompts from them.
CLASS_NAMES = [
    "apple",
    "bear",
    "bee",
    "bird",
    "boat",
    "bus",
    "cat",
    "cloud",
    "cow",
    "crab",
    "dog",
    "fish",
    "fox",
    "frog",
    "horse",
    "lion",
    "owl",
    "rose",
    "tree",
    "wolf",
]
TRAIN_PER_CLASS = 3
TEST_PER_CLASS = 2
IMAGE_SIZE = 16


def save_tiny_vit(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny `ViTModel` (no pooler) to `folder`; returns the folder."""
    from transformers import ViTConfig, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    return folder


def load_tiny_vit(folder: str | Path):
    """The saved tiny ViT, loaded the way the runner loads a backbone."""
    from transformers import ViTModel

    return ViTModel.from_pretrained(str(folder), add_pooling_layer=False).eval()


def write_char_tokenizer_files(folder: str | Path) -> None:
    """vocab.json + merges.txt of a CLIP BPE tokenizer over single characters (a-z, '.'; no merges).

    Covers every lowercase word, hence every class name here. `<|endoftext|>` has the largest id, as in
    the real CLIP vocabulary.
    """
    folder = Path(folder)
    letters = list(string.ascii_lowercase)
    words = [*letters, *[c + "</w>" for c in letters], ".", ".</w>"]
    tokens = ["<|startoftext|>", *words, "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_clip_config(tokenizer, *, eos_token_id: int | None = None, max_position_embeddings: int = 64):
    """A tiny `CLIPConfig` (width 32, 2 layers per tower, 16 px images, 4 px patches) for `tokenizer`."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=4,
        ),
        projection_dim=16,
    )


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny `CLIPModel` with its tokenizer and a 16 px `CLIPImageProcessor` to `folder`."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_char_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)  # tokenizer_config.json + special tokens: AutoTokenizer finds it
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(tokenizer)).eval().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return folder


def load_tiny_clip(folder: str | Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder)).eval()


def class_image(label: int, index: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A small RGB image whose colour encodes the class (plus a little seeded noise)."""
    rng = np.random.default_rng(1000 * label + index)
    hue = np.array([(label * 53) % 256, (label * 97 + 40) % 256, (label * 151 + 80) % 256], dtype=np.float64)
    pixels = hue[None, None, :] + rng.normal(0.0, 12.0, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def make_image_folder(
    root: str | Path,
    class_names: list[str] = CLASS_NAMES,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
) -> Path:
    """Write an `imagefolder` dataset: root/{train,test}/<class>/<i>.png; returns root."""
    root = Path(root)
    for split, count, offset in (("train", train_per_class, 0), ("test", test_per_class, 100)):
        for label, name in enumerate(class_names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                class_image(label, offset + i).save(folder / f"{i}.png")
    return root


def tiny_recipe_overrides(
    recipe: dict[str, Any],
    *,
    vit_dir: str | Path,
    clip_dir: str | Path,
    data_dir: str | Path,
    max_train_per_task: int = 6,
    max_test_per_task: int = 4,
) -> list[str]:
    """`section.key=value` overrides that run `recipe` on the tiny assets, one epoch, batch 4, on CPU.

    Only what cannot run on the stand-ins changes: the backbone, the data source and columns, the
    image size, the run length. Adapter values (method, pool sizes, prompt lengths, layers, ...) are
    left as the recipe states them: the tiny ViT has 5 layers, so every recipe's layers fit.
    """
    clip = recipe["adapter"].get("method") == "clip"
    return [
        f"model.base_model_name_or_path={clip_dir if clip else vit_dir}",
        f"data.dataset={data_dir}",
        "data.image_column=image",
        "data.label_column=label",
        "data.train_split=train",
        "data.test_split=test",
        "data.holdout_fraction=null",
        f"data.image_size={IMAGE_SIZE}",
        f"data.max_train_per_task={max_train_per_task}",
        f"data.max_test_per_task={max_test_per_task}",
        "training.num_train_epochs=1",
        "training.per_device_train_batch_size=4",
        "training.per_device_eval_batch_size=16",
        "training.use_cpu=true",
        "training.logging_steps=1000",
    ]


@dataclass(frozen=True)
class TinyAssets:
    """Folders of the tiny stand-ins: a ViT, a CLIP (model + tokenizer + image processor), an imagefolder."""

    vit: Path
    clip: Path
    data: Path

    def overrides(self, recipe: dict[str, Any], **kwargs: Any) -> list[str]:
        return tiny_recipe_overrides(
            recipe, vit_dir=self.vit, clip_dir=self.clip, data_dir=self.data, **kwargs
        )


_ASSETS: dict[Path, TinyAssets] = {}


def build_assets(tmp_path_factory) -> TinyAssets:
    """Write the tiny assets once per pytest session (shared by every module that asks)."""
    key = Path(tmp_path_factory.getbasetemp())
    if key not in _ASSETS:
        root = tmp_path_factory.mktemp("tiny_assets")
        _ASSETS[key] = TinyAssets(
            vit=save_tiny_vit(root / "vit"),
            clip=save_tiny_clip(root / "clip"),
            data=make_image_folder(root / "data"),
        )
    return _ASSETS[key]


@contextmanager
def torch_threads(count: int = 1):
    """Run with `count` intra-op threads (restored after). Tiny models are fastest single-threaded, and
    on a shared 2-core machine two spinning OpenMP threads make every op wait (measured: 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_png(matrix: Any, path: str | Path, title: str | None = None) -> Path:
    """Stand-in for `metrics.plot_accuracy_*` (same signature; writes a valid 2x2 PNG): drawing the real
    plots costs ~0.8 s per task, which dominates a 20-task run of a tiny model."""
    Image.new("RGB", (2, 2), (255, 255, 255)).save(path, format="PNG")
    return Path(path)


def file_digests(folder: str | Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder` (to check it was left untouched)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
