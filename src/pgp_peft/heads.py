"""Classifier heads on the method's features: a linear layer, or CLIP's text side (CoOp contexts).

A head maps features (B, D) to logits (B, C) given `class_task` (C,), the task that introduced each
class (-1: not seen yet). Heads also say which of their tensors an adapter saves (`adapter_tensors`,
by their saved names) and get `begin_task` calls.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import CLIPModel

from .config import PromptGradientProjectionConfig

CONTEXT_INIT_STD = 0.02  # CoOp


class LinearHead(nn.Linear):
    """features (B, D) -> logits (B, C); saved as `head.weight`, `head.bias`.

    Initialised as timm's ViT head, which the reference trains: weight trunc-normal (std 0.02), bias
    zero. (`nn.Linear`'s default, U(±1/√D) weights and bias, starts the classes off unequal; on the
    reference side-by-side it cost about 7 class-IL points for L2P-PGP.)
    """

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__(hidden_size, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

    def forward(
        self,
        features: torch.Tensor,
        class_task: torch.Tensor | None = None,
        task_id: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().forward(features.to(self.weight.dtype))

    def begin_task(self, task_id: int) -> None:
        """Nothing per task: the class mask restricts the logits."""

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{name}": tensor for name, tensor in self.state_dict(keep_vars=True).items()}


def _tokenizer_help(name: str | None) -> str:
    where = f"from {name!r}" if name else "(no base_model_name_or_path is set)"
    return (
        f"CLIP-PGP needs the CLIP tokenizer to build its class prompts and could not load it {where}. "
        "Pass one explicitly: PGPModel(config, base_model=clip, tokenizer=CLIPTokenizer.from_pretrained("
        "local_dir)) or PGPModel.from_pretrained(adapter, base_model=clip, tokenizer=...). A local copy of a "
        "CLIP checkpoint (e.g. openai/clip-vit-base-patch16) holds the tokenizer files (tokenizer.json, or "
        "vocab.json + merges.txt)."
    )


def load_clip_tokenizer(name_or_path: str | None, revision: str | None = None):
    """The tokenizer of the CLIP checkpoint `name_or_path` (AutoTokenizer), or a clear error.

    AutoTokenizer is used rather than `CLIPTokenizer.from_pretrained`, which silently builds a 2-token
    vocabulary from a directory without tokenizer files.
    """
    if not name_or_path:
        raise ValueError(_tokenizer_help(None))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as error:  # OSError (missing files / offline), ValueError (no backend), ...
        raise OSError(f"{_tokenizer_help(name_or_path)}\nUnderlying error: {error}") from error


class TextContextHead(nn.Module):
    """CLIP's text side as a head: a CoOp context per task, logits = scaled cosine to class texts.

    Class c is described by `[SOS, context of the task that introduced c, tokens of
    text_template.format(name), EOS, pad]` (CoOp's "X X ... X {name}." with the X's replaced by learned
    vectors) and encoded by `CLIPModel.get_text_features` itself (causal mask, pooled at EOS,
    `text_projection`): the class prompts are tokenized once with placeholder ids in the context slots,
    and a forward hook on the text tower's `token_embedding` replaces the placeholders' embeddings with
    the task contexts while `class_text_features` runs (the hook is inert otherwise), so no transformers
    internals are re-run. The image feature is `visual_projection` of the method's features (the
    post-LayerNorm CLS of the prompted pass). Logits = exp(logit_scale) · cos(image, class text).

    Contexts are stored one `nn.Parameter` per task (saved as `text_contexts.{t}`, shape (L_ctx, H_text))
    rather than one (T, L_ctx, H_text) tensor: `begin_task(t)` makes only context t trainable, so an
    optimizer with weight decay (the recipe's SGD uses 5e-4 / 2e-4) cannot shrink the contexts of
    finished tasks. `text_context` gives the stacked (T, L_ctx, H_text) view. The contexts are not
    projected by PGP.

    How many contexts: `config.num_tasks` if set, else `num_classes` (every task introduces at least
    one class, so there are never more tasks than classes; unused contexts cost L_ctx·H_text floats).

    Args:
        clip: the full `transformers.CLIPModel` (kept as a reference, not a submodule: it belongs to
            the backbone).
        config: the CLIP method's config (`class_names`, `text_context_length`, `text_template`).
        num_classes: C.
        tokenizer: the CLIP tokenizer (loaded from `config.base_model_name_or_path` if None); only used
            here, to tokenize the class prompts once.
    """

    def __init__(
        self, clip: CLIPModel, config: PromptGradientProjectionConfig, num_classes: int, tokenizer: Any = None
    ) -> None:
        super().__init__()
        if not isinstance(clip, CLIPModel):
            raise TypeError(
                f"CLIP-PGP needs a full transformers.CLIPModel (vision + text towers), got {type(clip).__name__}"
            )
        if tokenizer is None:
            name = config.base_model_name_or_path or getattr(clip, "name_or_path", None) or None
            tokenizer = load_clip_tokenizer(name, config.revision)
        self.__dict__["clip"] = clip  # a reference: the weights belong to the backbone
        self.config = config
        text_hidden = clip.text_model.config.hidden_size
        self.max_tasks = int(config.num_tasks or num_classes)
        self.text_contexts = nn.ParameterList(
            [
                nn.Parameter(
                    torch.empty(config.text_context_length, text_hidden).normal_(0.0, CONTEXT_INIT_STD)
                )
                for _ in range(self.max_tasks)
            ]
        )
        for task, context in enumerate(self.text_contexts):
            context.requires_grad_(task == 0)
        self._build_class_prompts(tokenizer)
        # (C, L_ctx, H_text) contexts the hook writes into the placeholder slots; None: hook inert.
        self._pending_contexts: torch.Tensor | None = None
        self._context_hook = clip.text_model.embeddings.token_embedding.register_forward_hook(
            self._insert_contexts_hook
        )

    clip: CLIPModel

    @property
    def text_context(self) -> torch.Tensor:
        """All task contexts stacked: (max_tasks, L_ctx, H_text)."""
        return torch.stack(list(self.text_contexts))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """`text_contexts.{t}` (the names pgp_peft 0.1.0 saved); the token-id buffers are rebuilt."""
        return {f"text_contexts.{task}": context for task, context in enumerate(self.text_contexts)}

    def _build_class_prompts(self, tokenizer) -> None:
        """Tokenize `text_template.format(name)` once per class, with placeholders for the context.

        Buffer (not saved; rebuilt from the class names): `text_input_ids` (C, 1 + L_ctx + S)
        `[SOS, SOS × L_ctx, name tokens, EOS, pad]`. The SOS id fills the context slots: the hook replaces
        their embeddings, and it is neither the EOS CLIP pools at (non-legacy configs) nor larger than it
        (legacy configs pool at the largest id), so CLIP's own pooling still lands on the EOS.
        """
        text_config = self.clip.text_model.config
        template = self.config.text_template
        bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if bos is None or eos is None:
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} has no BOS/EOS token; CLIP needs both"
            )
        rows: list[list[int]] = []
        for name in self.config.class_names:
            text = template.format(name.replace("_", " "))
            ids = list(tokenizer(text)["input_ids"])
            if len(ids) < 2 or ids[0] != bos or eos not in ids:
                raise ValueError(
                    f"tokenizing {text!r} gave {ids}: expected [SOS, ..., EOS] with SOS={bos}, EOS={eos}"
                )
            if ids.index(eos) <= 1:
                raise ValueError(
                    f"the tokenizer produced no tokens for class name {name!r} ({text!r} -> {ids}); "
                    "is it the CLIP checkpoint's tokenizer?"
                )
            bad = [i for i in ids if not 0 <= i < text_config.vocab_size]
            if bad:
                raise ValueError(
                    f"token ids {bad} of {text!r} exceed the text model's vocabulary ({text_config.vocab_size})"
                )
            rows.append(ids)
        width = max(len(ids) for ids in rows)
        length = width + self.config.text_context_length
        if length > text_config.max_position_embeddings:
            longest = self.config.class_names[max(range(len(rows)), key=lambda i: len(rows[i]))]
            raise ValueError(
                f"the class prompt for {longest!r} has {width} tokens + {self.config.text_context_length} context "
                f"vectors = {length} > the text model's max_position_embeddings "
                f"({text_config.max_position_embeddings}); shorten text_context_length or the class name/template"
            )
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
        # CLIPTextModel must pool at the EOS by its own rule (checked on the plain prompt).
        if text_config.eos_token_id == 2:  # legacy configs: the EOS is the largest id (see CLIPTextModel)
            # (openai/clip-* checkpoints): CLIPTextModel pools at argmax(input_ids).
            eos_index = ids.argmax(dim=-1)
            if not bool((ids.gather(1, eos_index[:, None]) == eos).all()):
                raise ValueError(
                    "the text model's config has the legacy eos_token_id=2, so CLIP pools at the largest token "
                    f"id, but the tokenizer's EOS ({eos}) is not the largest id of every class prompt. Use the "
                    "checkpoint's own tokenizer."
                )
        else:
            missing = [
                self.config.class_names[i]
                for i in range(len(rows))
                if text_config.eos_token_id not in rows[i]
            ]
            if missing:
                raise ValueError(
                    f"the text model's eos_token_id={text_config.eos_token_id} does not occur in the prompts of "
                    f"{missing}; the tokenizer's EOS is {eos}. Use the checkpoint's own tokenizer."
                )
        if bos == text_config.eos_token_id:
            raise ValueError(
                f"the tokenizer's SOS id {bos} is the text model's eos_token_id: the context placeholders would "
                "be pooled instead of the EOS. Use the checkpoint's own tokenizer."
            )
        context_slots = torch.full((len(rows), self.config.text_context_length), bos, dtype=torch.long)
        full_ids = torch.cat([ids[:, :1], context_slots, ids[:, 1:]], dim=1)
        self.register_buffer("text_input_ids", full_ids, persistent=False)

    # ------------------------------------------------------------------ text side
    def _insert_contexts_hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on `token_embedding`: output (C, 1 + L_ctx + S, H_text) with the placeholder rows
        1 .. L_ctx replaced by the pending contexts (C, L_ctx, H_text). Inert when none are pending."""
        contexts = self._pending_contexts
        if contexts is None:
            return output
        if output.shape[0] != contexts.shape[0]:
            raise ValueError(
                f"the text tower was called with {output.shape[0]} sequences while {contexts.shape[0]} class "
                "contexts were pending; only class_text_features() may run it with contexts"
            )
        length = contexts.shape[1]
        return torch.cat([output[:, :1], contexts.to(output.dtype), output[:, 1 + length :]], dim=1)

    @contextlib.contextmanager
    def _contexts_inserted(self, contexts: torch.Tensor) -> Iterator[None]:
        previous, self._pending_contexts = self._pending_contexts, contexts
        try:
            yield
        finally:
            self._pending_contexts = previous

    def class_contexts(self, class_task: torch.Tensor) -> torch.Tensor:
        """(C, L_ctx, H_text): the context of the task that introduced each class (`class_task[c]`);
        classes not seen yet use context 0 (their logits are masked unless class_mask='all')."""
        return self.text_context[class_task.clamp(min=0)]

    def class_text_features(self, class_task: torch.Tensor) -> torch.Tensor:
        """(C, P) text features of every class (not normalised): `CLIPModel.get_text_features` of
        `[SOS, context of the class's task, name tokens, EOS, pad]`."""
        with self._contexts_inserted(self.class_contexts(class_task)):
            return self.clip.get_text_features(input_ids=self.text_input_ids).pooler_output

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) post-LayerNorm CLS states -> (B, P) CLIP image embeddings (`visual_projection`)."""
        return self.clip.visual_projection(features)

    def forward(
        self,
        features: torch.Tensor,
        class_task: torch.Tensor,
        task_id: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features (B, D) post-LayerNorm CLS -> logits (B, C) = exp(logit_scale) · cosine similarity."""
        self._check_context_trainable(task_id)
        image = nn.functional.normalize(self.image_features(features), dim=-1)
        text = nn.functional.normalize(self.class_text_features(class_task), dim=-1)
        scale = self.clip.logit_scale.exp()
        return scale * image @ text.to(image.dtype).t()

    def _check_context_trainable(self, task_id) -> None:
        if task_id is None or not (self.training and torch.is_grad_enabled()):
            return
        tasks = task_id.unique().tolist() if isinstance(task_id, torch.Tensor) else [int(task_id)]
        for task in tasks:
            if not 0 <= task < self.max_tasks:
                raise ValueError(f"task {task} has no text context (max_tasks={self.max_tasks})")
            if not self.text_contexts[task].requires_grad:
                warnings.warn(
                    f"CLIP-PGP: training task {task} but its text context is frozen; call "
                    f"model.begin_task({task}) before building the task's optimizer",
                    stacklevel=4,
                )

    def begin_task(self, task_id: int) -> None:
        """Make only context `task_id` trainable (old contexts stay fixed, also under weight decay)."""
        if not 0 <= int(task_id) < self.max_tasks:
            raise ValueError(
                f"task {task_id} has no text context: this model holds {self.max_tasks} (one per task; "
                "config.num_tasks, or num_classes when it is not set)"
            )
        for task, context in enumerate(self.text_contexts):
            context.requires_grad_(task == int(task_id))
