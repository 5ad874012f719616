"""Prompt pools and key-query selection: the L2P pool, DualPrompt's G/E prefix pools, CLIP's image prompt.

Shapes use B = batch, P = pool size, L = prompt length, D = hidden size, k = top-k.
Nothing here knows about the backbone: pools produce tensors in embedding space; `backbones.py`
decides how they enter the transformer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

BATCHWISE_WARNING = (
    "batchwise_prompt=True: every sample of a batch uses the batch's majority prompts (the reference "
    "code's behaviour). At test time this assumes a batch comes from one task, which leaks task identity "
    "into class-incremental evaluation."
)


def init_prompt_(tensor: torch.Tensor, init: str) -> torch.Tensor:
    """Initialise a prompt or key tensor (..., D) in place.

    `uniform`: U(-1, 1), the reference's L2P / DualPrompt prompts and keys. `linear`: U(±1/√D),
    `nn.Linear`'s default weight init, which the reference CLIP image prompt gets (it is the weight
    of an `nn.Linear(D, L)`). `normal`: N(0, 0.02²). `zero`: zeros.
    """
    with torch.no_grad():
        if init == "uniform":
            tensor.uniform_(-1.0, 1.0)
        elif init == "linear":
            bound = 1.0 / math.sqrt(tensor.shape[-1])
            tensor.uniform_(-bound, bound)
        elif init == "zero":
            tensor.zero_()
        elif init == "normal":
            tensor.normal_(0.0, 0.02)
        else:
            raise ValueError(f"unknown prompt init {init!r}")
    return tensor


@dataclass
class PromptSelection:
    """Result of key-query selection.

    indices: (B, k) selected pool slots.
    similarity: (B, P) cosine similarity of each sample's query to every key.
    selected_similarity: (B, k) cosine similarity to the selected keys (carries the keys' gradient).
    """

    indices: torch.Tensor
    similarity: torch.Tensor
    selected_similarity: torch.Tensor

    def pull_constraint(self) -> torch.Tensor:
        """The reference's `reduce_sim`: similarity summed over the k selected keys, averaged over the batch."""
        return self.selected_similarity.sum() / self.selected_similarity.shape[0]


def cosine_similarity_to_keys(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query (B, D), keys (P, D) -> (B, P) cosine similarities of the L2-normalised vectors."""
    query = nn.functional.normalize(query, dim=-1)
    keys = nn.functional.normalize(keys, dim=-1)
    return query @ keys.t()


def batchwise_majority(indices: torch.Tensor, pool_size: int, top_k: int) -> torch.Tensor:
    """The reference's batch-wise vote: the k ids chosen most often in the batch, for every sample.

    indices (B, k) -> (B, k). Assumes the whole batch comes from one task, so it leaks task identity
    at test time; pgp_peft keeps it as an explicit, logged option only.
    """
    ids, counts = torch.unique(indices, return_counts=True, sorted=True)
    if ids.shape[0] < pool_size:
        pad = pool_size - ids.shape[0]
        ids = torch.cat([ids, torch.full((pad,), int(indices.min()), device=ids.device, dtype=ids.dtype)])
        counts = torch.cat([counts, torch.zeros(pad, device=counts.device, dtype=counts.dtype)])
    _, major = torch.topk(counts, k=top_k)
    return ids[major].unsqueeze(0).expand(indices.shape[0], -1)


def select_by_key(
    query: torch.Tensor,
    keys: torch.Tensor,
    top_k: int,
    *,
    forced_ids: torch.Tensor | None = None,
    batchwise: bool = False,
) -> PromptSelection:
    """Instance-wise top-k selection by cosine similarity between each query and the keys.

    query (B, D) from the frozen backbone, keys (P, D) trainable. `forced_ids` (B, k) overrides the
    choice (DualPrompt's prompt mask: the task id picks the slot while training); the pull term still
    uses the forced keys. `batchwise` applies the reference's majority vote (off by default).
    """
    similarity = cosine_similarity_to_keys(query.to(keys.dtype), keys)
    if forced_ids is not None:
        indices = forced_ids
    else:
        indices = similarity.topk(top_k, dim=-1).indices
        if batchwise:
            indices = batchwise_majority(indices, keys.shape[0], top_k)
    selected = similarity.gather(1, indices)
    return PromptSelection(indices=indices, similarity=similarity, selected_similarity=selected)


class L2PPromptPool(nn.Module):
    """L2P's pool: `pool_size` prompts of `length` tokens, each with a key; top-k prompts per sample.

    prompt: (P, L, D); key: (P, D). `gather` returns the selected prompts as (B, k·L, D) tokens.
    """

    def __init__(
        self,
        pool_size: int,
        length: int,
        hidden_size: int,
        top_k: int,
        prompt_init: str = "uniform",
        key_init: str = "uniform",
        use_keys: bool = True,
        batchwise: bool = False,
    ) -> None:
        super().__init__()
        self.pool_size, self.length, self.top_k = pool_size, length, top_k
        self.use_keys, self.batchwise = use_keys, batchwise
        if batchwise:
            logger.warning(BATCHWISE_WARNING)
        self.prompt = nn.Parameter(init_prompt_(torch.empty(pool_size, length, hidden_size), prompt_init))
        self.key = (
            nn.Parameter(init_prompt_(torch.empty(pool_size, hidden_size), key_init)) if use_keys else None
        )

    def select(self, query: torch.Tensor, forced_ids: torch.Tensor | None = None) -> PromptSelection:
        if self.key is None:
            # Without keys every sample uses the first k prompts (L2P's "no key" ablation).
            batch = query.shape[0]
            indices = torch.arange(self.top_k, device=query.device).expand(batch, -1)
            zeros = query.new_zeros(batch, self.pool_size)
            return PromptSelection(indices, zeros, zeros.gather(1, indices))
        return select_by_key(query, self.key, self.top_k, forced_ids=forced_ids, batchwise=self.batchwise)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, k) -> prompt tokens (B, k·L, D)."""
        batch = indices.shape[0]
        return self.prompt[indices].reshape(batch, self.top_k * self.length, -1)

    @property
    def num_tokens(self) -> int:
        return self.top_k * self.length


class PrefixPromptPool(nn.Module):
    """DualPrompt's prefixes: a shared G-prompt and a pool of task-specific E-prompts with keys.

    g_prompt: (len(g_layers), 2, L_g, D); e_prompt: (len(e_layers), 2, P, L_e, D); e_key: (P, D).
    Index 0 on the second axis is the key half, 1 the value half (prefix-tuning, prepended per head).
    """

    def __init__(
        self,
        hidden_size: int,
        g_layers: list[int],
        g_length: int,
        e_layers: list[int],
        e_length: int,
        pool_size: int,
        top_k: int = 1,
        prompt_init: str = "uniform",
        key_init: str = "uniform",
        batchwise: bool = False,
    ) -> None:
        super().__init__()
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        self.pool_size, self.top_k, self.batchwise = pool_size, top_k, batchwise
        if batchwise:
            logger.warning(BATCHWISE_WARNING)
        self.g_prompt = None
        if self.g_layers and g_length > 0:
            g = torch.empty(len(self.g_layers), 2, g_length, hidden_size)
            self.g_prompt = nn.Parameter(init_prompt_(g, prompt_init))
        self.e_prompt = None
        self.e_key = None
        if self.e_layers and e_length > 0:
            e = torch.empty(len(self.e_layers), 2, pool_size, e_length, hidden_size)
            self.e_prompt = nn.Parameter(init_prompt_(e, prompt_init))
            self.e_key = nn.Parameter(init_prompt_(torch.empty(pool_size, hidden_size), key_init))

    def select(self, query: torch.Tensor, forced_ids: torch.Tensor | None = None) -> PromptSelection | None:
        if self.e_key is None:
            return None
        return select_by_key(query, self.e_key, self.top_k, forced_ids=forced_ids, batchwise=self.batchwise)

    def prefixes(
        self, batch_size: int, indices: torch.Tensor | None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer prefixes {layer: (key (B, L, D), value (B, L, D))}; `indices` (B, k) picks E-prompts.

        Each sample gets its own prefix (no batch/key-value reshape mixing, unlike the reference).
        """
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.g_prompt is not None:
            for position, layer in enumerate(self.g_layers):
                key, value = self.g_prompt[position]
                out[layer] = (key.expand(batch_size, -1, -1), value.expand(batch_size, -1, -1))
        if self.e_prompt is not None and indices is not None:
            for position, layer in enumerate(self.e_layers):
                # (2, P, L_e, D)[:, indices] -> (2, B, k, L_e, D) -> (2, B, k·L_e, D)
                chosen = self.e_prompt[position][:, indices].flatten(2, 3)
                out[layer] = (chosen[0], chosen[1])
        return out

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Shared pool: a new task's E-prompt slot starts from the previous task's (reference behaviour)."""
        if self.e_prompt is not None and 0 <= source < self.pool_size and 0 <= target < self.pool_size:
            self.e_prompt[:, :, target] = self.e_prompt[:, :, source]


class ImagePrompt(nn.Module):
    """CLIP-PGP's image prompt: `length` tokens shared by all tasks, inserted after CLS. prompt: (L, D)."""

    def __init__(self, length: int, hidden_size: int, init: str = "uniform") -> None:
        super().__init__()
        self.prompt = nn.Parameter(init_prompt_(torch.empty(length, hidden_size), init))

    def tokens(self, batch_size: int) -> torch.Tensor:
        """-> (B, L, D)"""
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)
