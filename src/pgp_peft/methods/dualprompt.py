"""DualPrompt-PGP: a shared G-prompt and a key-selected pool of E-prompts, as attention prefixes.

Parameters: `prefix_pool.g_prompt` (len(g_layers), 2, L_g, D), `prefix_pool.e_prompt`
(len(e_layers), 2, P, L_e, D) and `prefix_pool.e_key` (P, D); index 0 of the second axis is the key
half, 1 the value half. The prefixes are prepended per head to the keys/values of their layers by the
`pgp_sdpa`/`pgp_eager` attention (`backbones.py`). While training, the task id picks the E-prompt slot
(prompt mask); a new task's slot starts as a copy of the previous task's (shared pool). Features: the
CLS output.

What PGP protects: the key halves of the G-prompt and of every E-prompt slot, against the attention
queries of their layer (prompted pass with the task's slot). Feature mode splits each layer into one
space per head (`prefix_l{layer}_h{head}`, dimension D/H: the prefix key of head h only meets the
queries of head h); reference mode keeps one space per layer (`prefix_l{layer}`, the authors' flattened
(B, H·N·d) rows, PCA width `reference_pca_components["prefix"]`). Value halves and E-prompt keys are
not projected (as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..backbones import VisionBackbone
from ..config import PROMPT_INITS, PromptGradientProjectionConfig, check_choice, check_int, check_types, fail
from ..projection import reference_pca
from ..prompts import PrefixPromptPool, PromptSelection, select_by_key
from .base import MethodCard, MethodOutput, PGPMethod, ProtectedSlice
from .prompt_selection import check_query, pull_loss, task_slots


@dataclass
class DualPromptConfig(PromptGradientProjectionConfig):
    """DualPrompt-PGP (`method="dualprompt"`); defaults are the paper's values.

    g_prompt_layers / g_prompt_length: the shared G-prompt (length 0 disables it).
    e_prompt_layers / e_prompt_length: the E-prompt pool of `pool_size` slots (length 0 disables it).
    pool_size, top_k: E-prompt slots, and slots selected per sample.
    prompt_init, key_init: `"uniform"` (U(-1, 1), as the reference), `"linear"` (U(±1/√D)), `"zero"` or
        `"normal"` (N(0, 0.02²)).
    batchwise_prompt: the reference's batch-wise majority vote (off: it leaks task identity at test time).
    prompt_mask: during training the task id selects the E-prompt slot.
    shared_pool_copy: a new task's E-prompt slot starts as a copy of the previous task's.
    pull_constraint_coeff: weight of the key-query similarity term subtracted from the loss.
    """

    method: str = "dualprompt"
    pool_size: int = 10
    top_k: int = 1
    g_prompt_layers: list[int] = field(default_factory=lambda: [0, 1])
    g_prompt_length: int = 5
    e_prompt_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    e_prompt_length: int = 5
    prompt_init: str = "uniform"
    key_init: str = "uniform"
    batchwise_prompt: bool = False
    prompt_mask: bool = True
    shared_pool_copy: bool = True
    pull_constraint_coeff: float = 1.0

    legacy_fields: ClassVar[dict[str, Any]] = {
        "tuning_type": "prefix",
        "query_source": "frozen_cls",
        "prompt_length": 5,
        "use_prompt_keys": True,
        "head_type": "token",
        "image_prompt_length": 10,
        "text_context_length": 16,
        "text_template": "{}.",
    }

    def check_field_types(self) -> None:
        super().check_field_types()
        check_types(
            self,
            strings=("prompt_init", "key_init"),
            bools=("batchwise_prompt", "prompt_mask", "shared_pool_copy"),
            numbers=("pull_constraint_coeff",),
            int_lists=("g_prompt_layers", "e_prompt_layers"),
        )

    def validate(self, num_hidden_layers: int | None = None) -> None:
        super().validate(num_hidden_layers)
        check_choice(self, "prompt_init", PROMPT_INITS)
        check_choice(self, "key_init", PROMPT_INITS)
        for name in ("pool_size", "top_k"):
            check_int(self, name, minimum=1)
        for name in ("g_prompt_length", "e_prompt_length"):
            check_int(self, name, minimum=0)
        if self.top_k > self.pool_size:
            fail("top_k", f"top_k={self.top_k} exceeds pool_size={self.pool_size}")
        if self.pull_constraint_coeff < 0:
            fail("pull_constraint_coeff", f"must be >= 0, got {self.pull_constraint_coeff!r}")
        for name in ("g_prompt_layers", "e_prompt_layers"):
            layers = getattr(self, name)
            if any(i < 0 for i in layers):
                fail(name, f"layer indices must be >= 0, got {layers}")
            if len(set(layers)) != len(layers):
                fail(name, f"layer indices must be unique, got {layers}")
            if num_hidden_layers is not None and any(i >= num_hidden_layers for i in layers):
                fail(name, f"layer indices {layers} exceed the backbone's depth ({num_hidden_layers} layers)")
        if set(self.g_prompt_layers) & set(self.e_prompt_layers):
            fail("e_prompt_layers", "G- and E-prompt layers must not overlap")


class DualPromptMethod(PGPMethod):
    """DualPrompt's G/E prefix pools on a frozen backbone (see the module docstring)."""

    name = "dualprompt"
    uses_query = True
    card = MethodCard(
        name="DualPrompt",
        contents="the G-prompt, the E-prompt pool, its keys and the classification head",
        settings=(
            "g_prompt_layers",
            "g_prompt_length",
            "e_prompt_layers",
            "e_prompt_length",
            "pool_size",
            "top_k",
            "pull_constraint_coeff",
            "prompt_mask",
        ),
    )

    def __init__(self, config: DualPromptConfig, backbone: VisionBackbone) -> None:
        super().__init__(config, backbone)
        if not backbone.family.passes_attention_kwargs:
            raise TypeError(
                f"DualPrompt's prefixes reach attention through forward kwargs, which {type(backbone.vision).__name__} "
                "does not pass to its attention function; use L2P on this backbone"
            )
        self.prefix_pool = PrefixPromptPool(
            backbone.hidden_size,
            config.g_prompt_layers,
            config.g_prompt_length,
            config.e_prompt_layers,
            config.e_prompt_length,
            config.pool_size,
            config.top_k,
            config.prompt_init,
            config.key_init,
            batchwise=config.batchwise_prompt,
        )

    @property
    def prefix_layers(self) -> list[int]:
        return [*self.config.g_prompt_layers, *self.config.e_prompt_layers]

    def features(self, pixel_values, task_id=None, *, query=None, use_task_slot=None) -> MethodOutput:
        """pixel_values (B, C, H, W) -> CLS features (B, D) and the E-prompt selection (None without E-prompts)."""
        batch = pixel_values.shape[0]
        forced = task_slots(self, task_id, batch, pixel_values.device, use_task_slot)
        selection = None
        if self.prefix_pool.e_key is not None:
            # The pull term needs the query-key similarity even when the task id forces the slot.
            if query is None:
                query = self.backbone.query(pixel_values)
            check_query(query, batch, self.backbone.hidden_size)
            selection = self.prefix_pool.select(query, forced)
        prefixes = self.prefix_pool.prefixes(batch, selection.indices if selection is not None else None)
        hidden = self.backbone(pixel_values, prefixes=prefixes)
        return MethodOutput(self.backbone.pool(hidden), selection)

    def auxiliary_loss(self, selection: PromptSelection | None) -> torch.Tensor | None:
        return pull_loss(self.config.pull_constraint_coeff, selection)

    # ------------------------------------------------------------------ what PGP protects
    def prefix_space_names(self, layer: int) -> list[str]:
        """Feature mode protects each head of a prefix layer separately; reference mode the whole layer."""
        if self.config.projection_space == "reference":
            return [f"prefix_l{layer}"]
        return [f"prefix_l{layer}_h{head}" for head in range(self.backbone.num_heads)]

    def protected_spaces(self) -> dict[str, int]:
        hidden = self.backbone.hidden_size
        dim = hidden if self.config.projection_space == "reference" else hidden // self.backbone.num_heads
        return {name: dim for layer in self.prefix_layers for name in self.prefix_space_names(layer)}

    def protected_slices(self) -> list[ProtectedSlice]:
        """The key halves of the G-prompt and of every E-prompt slot, per head (feature mode)."""
        out: list[ProtectedSlice] = []
        pool = self.prefix_pool
        if pool.g_prompt is not None:
            for position, layer in enumerate(pool.g_layers):
                out.append(ProtectedSlice(pool.g_prompt, (position, 0), self.prefix_space_names(layer)))
        if pool.e_prompt is not None:
            for position, layer in enumerate(pool.e_layers):
                out.append(ProtectedSlice(pool.e_prompt, (position, 0), self.prefix_space_names(layer)))
        return out

    def _record_prefix_queries(self, pixel_values: torch.Tensor, task_id: int) -> dict[int, torch.Tensor]:
        """{layer: queries (B, H, N, d)} of a prompted pass with the task's own E-prompt slots.

        The slots are known (the prompt mask), so the frozen query pass that key selection needs is
        skipped; beyond the pool (more tasks than slots) the slots are chosen by key as in training.
        """
        queries: dict[int, torch.Tensor] = {}
        layers = set(self.prefix_layers)

        def record(layer: int, query: torch.Tensor) -> None:
            if layer in layers:
                queries[layer] = query

        batch = pixel_values.shape[0]
        slots = task_slots(self, task_id, batch, pixel_values.device, use_task_slot=True)
        if slots is None:
            with self.backbone.recording(query_recorder=record):
                self.features(pixel_values, task_id, use_task_slot=True)
        else:
            prefixes = self.prefix_pool.prefixes(batch, slots)
            self.backbone(pixel_values, prefixes=prefixes, query_recorder=record)
        return queries

    def memory_rows(
        self, pixel_values: torch.Tensor, task_id: int, *, query: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Head h of a prefix layer protects against the queries of head h: rows (B, N, d). (The stored
        frozen queries are not needed: the task's slots are known.)"""
        rows: dict[str, torch.Tensor] = {}
        for layer, query in self._record_prefix_queries(pixel_values, task_id).items():
            for head, name in enumerate(self.prefix_space_names(layer)):
                rows[name] = query[:, head]
        return rows

    def reference_slots(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """(B, k) E-prompt slots of the reference's memory pass, or None without E-prompts.

        The reference calls `model(input)` in eval mode there, with neither the task id nor the frozen
        model's CLS features: the prompt mask is off, and each sample (its memory loader has batch size
        1, so no batch-wise vote) selects its slots by key against the fallback query of its EPrompt,
        the token-wise max of the embedded input (CLS + patches, with position embeddings).
        """
        if self.prefix_pool.e_key is None:
            return None
        query = self.backbone.embeddings(pixel_values).amax(dim=1)  # (B, N, D) -> (B, D)
        return select_by_key(query, self.prefix_pool.e_key, self.config.top_k).indices

    def reference_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        """One row per sample and layer: the queries (B, H, N, d) of a prompted pass with the slots the
        reference's memory pass uses (`reference_slots`), flattened row-major, as the reference."""
        layers = set(self.prefix_layers)
        rows: dict[str, torch.Tensor] = {}

        def record(layer: int, query: torch.Tensor) -> None:
            if layer in layers:
                rows[f"prefix_l{layer}"] = query.flatten(1)

        prefixes = self.prefix_pool.prefixes(pixel_values.shape[0], self.reference_slots(pixel_values))
        self.backbone(pixel_values, prefixes=prefixes, query_recorder=record)
        return rows

    def reference_representations(
        self, rows: dict[str, torch.Tensor], task_id: int
    ) -> dict[str, torch.Tensor]:
        width = self.config.reference_pca_components["prefix"]
        return {
            name: reference_pca(matrix.to(torch.float64), min(width, *matrix.shape))
            for name, matrix in rows.items()
        }

    # ------------------------------------------------------------------ continual bookkeeping
    def begin_task(self, task_id: int) -> None:
        """Shared pool: the new task's slots start from the previous task's."""
        if self.config.shared_pool_copy and task_id > 0:
            top_k = self.config.top_k
            for offset in range(top_k):
                self.prefix_pool.copy_slot((task_id - 1) * top_k + offset, task_id * top_k + offset)
