"""`PGPMethod`: what a continual-learning method tells `PGPModel` and the memory update.

A method owns its trainable tensors and everything that depends on which method it is: how its
tensors enter the frozen backbone (prompt tokens, prefixes, injected layers), which slices of them
PGP protects and against which rows, its per-task setup, its head, and its model-card wording.
`PGPModel` (backbone + method + head + null-space memory) and `memory.py` only call this interface.

Shapes: B = batch, D = backbone hidden size, C = classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..backbones import VisionBackbone
from ..config import PromptGradientProjectionConfig, fail
from ..heads import LinearHead
from ..prompts import PromptSelection


class ProtectedSlice(NamedTuple):
    """`parameter[index]` is projected against `spaces` (one space, or one per head, splitting the
    last axis into equal head blocks); the projection acts on the last axis."""

    parameter: nn.Parameter
    index: tuple
    spaces: list[str]


class MethodOutput(NamedTuple):
    """features (B, D) for the head; selection: the key-query selection (None without keys)."""

    features: torch.Tensor
    selection: PromptSelection | None = None


@dataclass(frozen=True)
class MethodCard:
    """How the model card describes a method.

    name: display name (`"L2P"`); contents: what the adapter file holds; settings: config keys shown
    in the card; tags: Hub tags added to the library's; selection_text: `None` when prompts are selected
    per sample by key (the card then explains instance- or batch-wise selection), else the sentence to
    show instead.
    """

    name: str
    contents: str
    settings: tuple[str, ...]
    tags: tuple[str, ...] = ("prompt-tuning",)
    selection_text: str | None = None


class PGPMethod(nn.Module):
    """Base class of a method. Subclasses set `name` and `card` and implement the abstract methods.

    Args:
        config: the method's config (a `PromptGradientProjectionConfig` subclass).
        backbone: the frozen `VisionBackbone`. The method keeps a plain reference to it (not a
            submodule), so the backbone's weights appear once in `PGPModel`'s state dict.
    """

    name: ClassVar[str]
    card: ClassVar[MethodCard]
    # Whether `features` selects prompts by a frozen query (B, D) it can be given precomputed (`query=`):
    # the trainer's query cache is used only then.
    uses_query: ClassVar[bool] = False
    # Files `save_extra` writes into the adapter folder (fetched before `load_extra`, also from the Hub).
    extra_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PromptGradientProjectionConfig, backbone: VisionBackbone) -> None:
        super().__init__()
        self.config = config
        self.__dict__["backbone"] = backbone  # a reference, not a registered submodule

    backbone: VisionBackbone

    # ------------------------------------------------------------------ forward
    def features(
        self,
        pixel_values: torch.Tensor,
        task_id: int | torch.Tensor | None = None,
        *,
        query: torch.Tensor | None = None,
        use_task_slot: bool | None = None,
    ) -> MethodOutput:
        """The method's pass: pixel_values (B, C, H, W) -> features (B, D) and the prompt selection.

        `query` (B, D): the frozen query, if already computed (None: the method computes it when it
        needs one). `use_task_slot` forces (True) or forbids (False) selecting prompts by task id;
        default: while training only."""
        raise NotImplementedError

    def auxiliary_loss(self, selection: PromptSelection | None) -> torch.Tensor | None:
        """A term added to the cross-entropy loss (L2P/DualPrompt: minus the pull constraint)."""
        return None

    def build_head(self, num_classes: int, tokenizer: Any = None) -> nn.Module:
        """The classifier on the features: a linear head unless the method says otherwise."""
        if not num_classes:
            fail("num_classes", f"required for the linear classification head of {type(self).__name__}")
        return LinearHead(self.backbone.hidden_size, num_classes)

    # ------------------------------------------------------------------ what PGP protects
    def protected_spaces(self) -> dict[str, int]:
        """Space name -> dimension of the vectors it protects."""
        raise NotImplementedError

    def protected_slices(self) -> list[ProtectedSlice]:
        """The slices the projection acts on (last axis = the space's dimension)."""
        raise NotImplementedError

    def threshold(self, space: str) -> float:
        """Energy threshold ε of a space: `key_threshold` for the space `key`, else `prompt_threshold`."""
        return self.config.key_threshold if space == "key" else self.config.prompt_threshold

    def memory_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        """Feature mode: {space: rows (..., dim)} that one batch of memory samples shows each space.

        A method with `uses_query` also takes `query=` (B, D): the batch's stored frozen queries."""
        raise NotImplementedError

    def prompt_terms(self) -> dict[str, torch.Tensor]:
        """Feature mode: {space: the current prompts as rows (n, dim)} (the p_t of p_t Δpᵀ = 0)."""
        return {}

    def reference_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        """Reference mode: {space: one flattened row per sample (B, F)} for one batch."""
        raise NotImplementedError(f"{type(self).__name__} has no reference-mode memory")

    def reference_representations(
        self, rows: dict[str, torch.Tensor], task_id: int
    ) -> dict[str, torch.Tensor]:
        """Reference mode: {space: representation (dim, m)} from all memory rows {space: (n, F)}."""
        raise NotImplementedError(f"{type(self).__name__} has no reference-mode memory")

    def memory_timing(self) -> str:
        """When the memory is updated: `"end"` of a task (default) or `"start"` (reference L2P)."""
        return "end"

    # ------------------------------------------------------------------ continual bookkeeping
    def begin_task(self, task_id: int) -> None:
        """Per-task setup before the task's optimizer is built."""

    # ------------------------------------------------------------------ persistence
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The method's tensors (live parameters and persistent buffers) by their saved name.

        Default: the module's own state-dict names (`prompt_pool.prompt`, ...), the names pgp_peft 0.1.0
        saved. A method whose tensors live inside the backbone (injected layers) overrides this."""
        return dict(self.state_dict(keep_vars=True))

    def save_extra(self, directory: Path) -> None:
        """Write `extra_files` besides config.json and model.safetensors (default: none)."""

    def load_extra(self, directory: Path) -> None:
        """Read `extra_files` from `directory`, after the adapter tensors were loaded (default: nothing)."""
