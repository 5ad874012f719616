"""CLIP-PGP: one image prompt shared by all tasks in CLIP's vision tower + a CoOp text context per task.

Image side (this method). One prompt of `image_prompt_length` tokens is inserted right after CLS by
`VisionBackbone`'s embeddings hook: `[CLS, prompt, patches]`. The hook runs on the output of
`CLIPVisionEmbeddings` (patches + CLS + position embeddings), i.e. *before* CLIP's `pre_layrnorm`. That
placement is deliberate: CLIP normalises every token entering its encoder with `pre_layrnorm`, and its
first layer was trained only on such normalised rows, so the prompt is normalised exactly like the
tokens it joins (a prompt inserted after the LayerNorm would enter the residual stream at a scale no
pretrained token has). It is also where the reference inserts its `instance_tokens` (before `ln_pre`).
The prompt gets no position embedding (as the reference). Features: the post-LayerNorm CLS of the
prompted pass.

Text side: `heads.TextContextHead` (CoOp contexts, logits = scaled cosine to the class texts).

What PGP protects: the image prompt (space `image_prompt`), against the vision embeddings it meets
(CLS + patches with position, before `pre_layrnorm`: the reference's `act['rep']`) plus the prompt
itself; the text contexts are not projected. Reference mode PCA-reduces the per-sample embeddings and
the prompt to `reference_pca_components["clip"]` components, adding both on every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import VisionBackbone
from ..config import PROMPT_INITS, PromptGradientProjectionConfig, check_choice, check_int, check_types, fail
from ..heads import TextContextHead
from ..projection import reference_pca
from ..prompts import ImagePrompt
from .base import MethodCard, MethodOutput, PGPMethod, ProtectedSlice


@dataclass
class CLIPPromptConfig(PromptGradientProjectionConfig):
    """CLIP-PGP (`method="clip"`): needs `class_names` (one per class, in class order).

    image_prompt_length: tokens of the shared image prompt.
    text_context_length: CoOp context vectors per task.
    text_template: the class text around the name, `"{}."` gives "X X ... X {name}.".
    prompt_init: init of the image prompt: `"linear"` (U(±1/√D), the reference: its image prompt is the
        weight of an `nn.Linear`), `"normal"` (N(0, 0.02²)), `"uniform"` (U(-1, 1)) or `"zero"`.
    """

    method: str = "clip"
    image_prompt_length: int = 10
    text_context_length: int = 16
    text_template: str = "{}."
    prompt_init: str = "linear"

    legacy_fields: ClassVar[dict[str, Any]] = {
        "tuning_type": "prompt",
        "query_source": "frozen_cls",
        "pool_size": 1,
        "prompt_length": 10,
        "top_k": 1,
        "g_prompt_layers": [],
        "g_prompt_length": 0,
        "e_prompt_layers": [],
        "e_prompt_length": 0,
        "key_init": "uniform",
        "use_prompt_keys": False,
        "batchwise_prompt": False,
        "prompt_mask": False,
        "shared_pool_copy": False,
        "head_type": "token",
        "pull_constraint_coeff": 0.0,
    }

    def check_field_types(self) -> None:
        super().check_field_types()
        check_types(self, strings=("text_template", "prompt_init"))

    def validate(self, num_hidden_layers: int | None = None) -> None:
        super().validate(num_hidden_layers)
        check_choice(self, "prompt_init", PROMPT_INITS)
        for name in ("image_prompt_length", "text_context_length"):
            check_int(self, name, minimum=1)


class CLIPPromptMethod(PGPMethod):
    """CLIP-PGP's image prompt; its head is the text side (see the module docstring)."""

    name = "clip"
    card = MethodCard(
        name="CLIP",
        contents="the shared image prompt and the per-task text contexts",
        settings=("image_prompt_length", "text_context_length", "text_template"),
        selection_text="not applicable: CLIP uses one image prompt shared by all tasks (no prompt pool).",
    )

    def __init__(self, config: CLIPPromptConfig, backbone: VisionBackbone) -> None:
        super().__init__(config, backbone)
        if not backbone.family.has_text_tower:
            raise TypeError(
                f"CLIP-PGP needs a full transformers.CLIPModel (vision + text towers), got "
                f"{type(backbone.model).__name__}"
            )
        if not config.class_names:
            fail(
                "class_names",
                "CLIP-PGP builds its text prompts from readable class names, one per class in class order. "
                "Set class_names=[...] in the config (or the recipe's `class_names`), e.g. from the "
                "dataset's ClassLabel: dataset.features['label'].names.",
            )
        self.image_prompt = ImagePrompt(config.image_prompt_length, backbone.hidden_size, config.prompt_init)

    def build_head(self, num_classes: int, tokenizer: Any = None) -> nn.Module:
        return TextContextHead(self.backbone.model, self.config, num_classes, tokenizer)

    def features(self, pixel_values, task_id=None, *, query=None, use_task_slot=None) -> MethodOutput:
        """pixel_values (B, C, H, W) -> post-LayerNorm CLS of the prompted pass (B, D); no selection."""
        if query is not None:
            raise ValueError("method='clip' selects no prompts by key: it takes no query")
        tokens = self.image_prompt.tokens(pixel_values.shape[0])
        hidden = self.backbone(pixel_values, prompt_tokens=tokens)
        return MethodOutput(self.backbone.pool(hidden, num_prompt_tokens=tokens.shape[1]))

    # ------------------------------------------------------------------ what PGP protects
    def protected_spaces(self) -> dict[str, int]:
        return {"image_prompt": self.backbone.hidden_size}

    def protected_slices(self) -> list[ProtectedSlice]:
        return [ProtectedSlice(self.image_prompt.prompt, (), ["image_prompt"])]

    @torch.no_grad()
    def embedding_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, D) what the image prompt meets: the vision embeddings output (CLS + patches, position
        embeddings added, before `pre_layrnorm`), recorded before the prompt joins them."""
        tokens: list[torch.Tensor] = []
        self.backbone(pixel_values, token_recorder=tokens.append)
        return tokens[0].detach()

    def memory_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        return {"image_prompt": self.embedding_rows(pixel_values)}

    def prompt_terms(self) -> dict[str, torch.Tensor]:
        return {"image_prompt": self.image_prompt.prompt.detach()}

    def reference_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        return {"image_prompt": self.embedding_rows(pixel_values).flatten(1)}

    def reference_representations(
        self, rows: dict[str, torch.Tensor], task_id: int
    ) -> dict[str, torch.Tensor]:
        width = self.config.reference_pca_components["clip"]
        prompt = self.image_prompt.prompt.detach().to(torch.float64).cpu()  # (L, D), added on every task
        matrix = rows["image_prompt"].to(torch.float64)
        return {"image_prompt": reference_pca(matrix, width) + reference_pca(prompt.t(), width)}
