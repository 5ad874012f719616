"""L2P-PGP: a pool of prompts selected per sample by key-query matching, inserted after CLS.

Parameters: `prompt_pool.prompt` (P, L, D) and `prompt_pool.key` (P, D). The frozen CLS feature of
the unprompted image is the query; the top-k prompts (k·L tokens) enter the backbone after CLS with
the CLS position embedding (`VisionBackbone`'s embeddings hook). Features: the mean of the prompt
tokens' outputs (`head_type="prompt"`, the paper) or the CLS output (`"token"`).

What PGP protects (feature mode):
    prompt <- tokens entering layer 0 (CLS + patches with position) + the old prompts
    key    <- the frozen CLS queries
Reference mode (the authors' code): rows are the patch embeddings and the queries of each memory
sample, PCA-reduced (`reference_pca_components["prompt"]`, `["key"]`), with the old prompt pool added
from the second task on; the reference builds this memory at the *start* of a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backbones import VisionBackbone
from ..config import PROMPT_INITS, PromptGradientProjectionConfig, check_choice, check_int, check_types, fail
from ..projection import reference_pca
from ..prompts import L2PPromptPool, PromptSelection
from .base import MethodCard, MethodOutput, PGPMethod, ProtectedSlice
from .prompt_selection import check_query, pull_loss, task_slots

HEAD_TYPES = ("prompt", "token")


@dataclass
class L2PConfig(PromptGradientProjectionConfig):
    """L2P-PGP (`method="l2p"`); defaults are the paper's values.

    pool_size, prompt_length, top_k: a pool of `pool_size` prompts of `prompt_length` tokens, `top_k`
        selected per sample.
    prompt_init, key_init: `"uniform"` (U(-1, 1), as the reference), `"linear"` (U(±1/√D)), `"zero"` or
        `"normal"` (N(0, 0.02²)).
    use_prompt_keys: learn keys and select prompts by key-query cosine similarity (False: every sample
        uses the first `top_k` prompts, L2P's "no key" ablation).
    batchwise_prompt: the reference's batch-wise majority vote over selected ids. Off by default: it
        assumes a test batch comes from a single task (an evaluation leak).
    prompt_mask: during training the task id selects the prompt slots.
    head_type: `"prompt"` (mean of prompt-token outputs) or `"token"` (CLS output).
    pull_constraint_coeff: weight of the key-query similarity term subtracted from the loss.
    """

    method: str = "l2p"
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    prompt_init: str = "uniform"
    key_init: str = "uniform"
    use_prompt_keys: bool = True
    batchwise_prompt: bool = False
    prompt_mask: bool = False
    head_type: str = "prompt"
    pull_constraint_coeff: float = 0.1

    legacy_fields: ClassVar[dict[str, Any]] = {
        "tuning_type": "prompt",
        "query_source": "frozen_cls",
        "g_prompt_layers": [],
        "g_prompt_length": 0,
        "e_prompt_layers": [],
        "e_prompt_length": 0,
        "shared_pool_copy": False,
        "image_prompt_length": 10,
        "text_context_length": 16,
        "text_template": "{}.",
    }

    def check_field_types(self) -> None:
        super().check_field_types()
        check_types(
            self,
            strings=("head_type", "prompt_init", "key_init"),
            bools=("use_prompt_keys", "batchwise_prompt", "prompt_mask"),
            numbers=("pull_constraint_coeff",),
        )

    def validate(self, num_hidden_layers: int | None = None) -> None:
        super().validate(num_hidden_layers)
        check_choice(self, "head_type", HEAD_TYPES)
        check_choice(self, "prompt_init", PROMPT_INITS)
        check_choice(self, "key_init", PROMPT_INITS)
        for name in ("pool_size", "prompt_length", "top_k"):
            check_int(self, name, minimum=1)
        if self.top_k > self.pool_size:
            fail("top_k", f"top_k={self.top_k} exceeds pool_size={self.pool_size}")
        if self.pull_constraint_coeff < 0:
            fail("pull_constraint_coeff", f"must be >= 0, got {self.pull_constraint_coeff!r}")


class L2PMethod(PGPMethod):
    """The L2P prompt pool on a frozen backbone (see the module docstring)."""

    name = "l2p"
    uses_query = True
    card = MethodCard(
        name="L2P",
        contents="the prompt pool, its keys and the classification head",
        settings=("pool_size", "prompt_length", "top_k", "head_type", "pull_constraint_coeff"),
    )

    def __init__(self, config: L2PConfig, backbone: VisionBackbone) -> None:
        super().__init__(config, backbone)
        self.prompt_pool = L2PPromptPool(
            config.pool_size,
            config.prompt_length,
            backbone.hidden_size,
            config.top_k,
            config.prompt_init,
            config.key_init,
            use_keys=config.use_prompt_keys,
            batchwise=config.batchwise_prompt,
        )

    def features(self, pixel_values, task_id=None, *, query=None, use_task_slot=None) -> MethodOutput:
        """pixel_values (B, C, H, W) -> features (B, D) and the selection of the top-k prompts."""
        if query is None:
            query = self.backbone.query(pixel_values)
        check_query(query, pixel_values.shape[0], self.backbone.hidden_size)
        forced = task_slots(self, task_id, pixel_values.shape[0], pixel_values.device, use_task_slot)
        selection = self.prompt_pool.select(query, forced)
        tokens = self.prompt_pool.gather(selection.indices)
        hidden = self.backbone(pixel_values, prompt_tokens=tokens)
        if self.config.head_type == "prompt":
            start = self.backbone.num_special_tokens
            features = hidden[:, start : start + tokens.shape[1]].mean(dim=1)
        else:
            features = self.backbone.pool(hidden, num_prompt_tokens=tokens.shape[1])
        return MethodOutput(features, selection)

    def auxiliary_loss(self, selection: PromptSelection | None) -> torch.Tensor | None:
        return pull_loss(self.config.pull_constraint_coeff, selection)

    # ------------------------------------------------------------------ what PGP protects
    def protected_spaces(self) -> dict[str, int]:
        hidden = self.backbone.hidden_size
        return {"prompt": hidden, "key": hidden}

    def protected_slices(self) -> list[ProtectedSlice]:
        """The whole prompt pool and the keys (rows not selected have zero gradient anyway)."""
        out = [ProtectedSlice(self.prompt_pool.prompt, (), ["prompt"])]
        if self.prompt_pool.key is not None:
            out.append(ProtectedSlice(self.prompt_pool.key, (), ["key"]))
        return out

    def memory_rows(
        self, pixel_values: torch.Tensor, task_id: int, *, query: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """prompt: the tokens entering layer 0 (B, N, D); key: the frozen queries (B, D). With the stored
        queries (`query`), the embeddings alone give the prompt rows: no backbone pass."""
        if query is not None:
            return {"prompt": self.backbone.embeddings(pixel_values), "key": query}
        tokens: list[torch.Tensor] = []
        hidden = self.backbone(pixel_values, token_recorder=tokens.append)
        return {"prompt": tokens[0], "key": self.backbone.pool(hidden)}

    def prompt_terms(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt_rows()}

    def prompt_rows(self) -> torch.Tensor:
        """The current prompts as rows (P·L, D)."""
        return self.prompt_pool.prompt.detach().reshape(-1, self.backbone.hidden_size)

    def reference_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        return {
            "prompt": self.backbone.patch_embeddings(pixel_values).flatten(1),
            "key": self.backbone.query(pixel_values).flatten(1),
        }

    def reference_representations(
        self, rows: dict[str, torch.Tensor], task_id: int
    ) -> dict[str, torch.Tensor]:
        widths = self.config.reference_pca_components
        prompt = reference_pca(rows["prompt"].to(torch.float64), widths["prompt"])
        if task_id >= 1:  # the prompt term starts at the second task in the reference
            pool = self.prompt_rows().to(torch.float64).cpu()  # (P·L, D)
            prompt = prompt + reference_pca(pool.t(), widths["prompt"])
        key = reference_pca(rows["key"].to(torch.float64), widths["key"])
        return {"prompt": prompt, "key": key}

    def memory_timing(self) -> str:
        """The reference L2P builds its memory at the start of a task (with that task's samples and the
        previous prompts; the new projector is used from the next task on); feature mode at the end."""
        return "start" if self.config.projection_space == "reference" else "end"
