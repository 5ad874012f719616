"""Building the null-space memory at a task boundary: what each protected space "sees".

Streams a task's memory samples through the model (no grad, eval mode) and hands the resulting
representations to `projection.py`:

* feature mode (default, docs/ALGORITHM.md §2): per space a D x D Gram matrix of token rows, summed over
  batches (and over processes with `reduce_fn`), plus the old prompts' Gram for prompt spaces;
* reference mode (§3): one flattened row per memory sample, PCA-reduced as in the authors' code.

Which rows protect which space is the method's business (`PGPMethod.memory_rows`, `prompt_terms`,
`reference_rows`, `reference_representations`); this module streams, sums and hands over.

Reference mode reproduces the reference pipeline's inputs too: the memory samples go through the
training transform (every method: the reference draws them from its training loader; the trainer's
default), and each method's `reference_rows` runs the pass the reference's memory code runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .projection import BasisUpdate, GramAccumulator, balanced_sum

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
# row ids of a batch -> their stored frozen queries (B, D), or None (see `query_cache.QueryCache.lookup`)
QueryLookup = Callable[[Sequence[int]], "torch.Tensor | None"]


class NonFiniteMemoryError(FloatingPointError):
    """A protected space's Gram matrix / representation holds NaN or inf (the model diverged)."""


def _check_finite(name: str, matrix: torch.Tensor) -> torch.Tensor:
    """One host sync per space per task boundary, before the eigendecomposition that would fail on it."""
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteMemoryError(f"non-finite values in the memory representation of space {name!r}")
    return matrix


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _batches(batches: Iterable, memory_samples: int | None) -> Iterable[torch.Tensor]:
    """Yield pixel_values tensors until `memory_samples` samples were produced (None = all)."""
    for pixel_values, _ in _batches_with_rows(batches, memory_samples):
        yield pixel_values


def _batches_with_rows(
    batches: Iterable, memory_samples: int | None
) -> Iterable[tuple[torch.Tensor, list[int] | None]]:
    """(pixel_values, row ids or None) until `memory_samples` samples were produced (None = all)."""
    produced = 0
    for batch in batches:
        pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
        rows = batch.get("row_id") if isinstance(batch, dict) else None
        if memory_samples is not None:
            remaining = memory_samples - produced
            if remaining <= 0:
                break
            pixel_values = pixel_values[:remaining]
            rows = None if rows is None else list(rows)[:remaining]
        produced += pixel_values.shape[0]
        yield pixel_values, rows


@torch.no_grad()
def collect_feature_grams(
    model,
    batches: Iterable,
    task_id: int,
    memory_samples: int | None,
    query_lookup: QueryLookup | None = None,
) -> dict[str, torch.Tensor]:
    """Stream memory samples and return {space: D x D Gram matrix (float64)} of what each space sees,
    plus {space}__prompt_term: the Gram matrix of the current prompts for the spaces that have one.

    `query_lookup`: stored frozen queries of a batch's rows (the training query cache), handed to a
    method that selects by query (`PGPMethod.uses_query`) so it can skip its frozen pass (L2P: the key
    space's rows come from it and the prompt space's from the embeddings alone)."""
    method = model.method
    device = next(model.parameters()).device
    grams = {name: GramAccumulator(dim, device=device) for name, dim in method.protected_spaces().items()}
    if not method.uses_query:
        query_lookup = None
    for pixel_values, row_ids in _batches_with_rows(batches, memory_samples):
        queries = query_lookup(row_ids) if (query_lookup is not None and row_ids) else None
        pixel_values = pixel_values.to(device)
        if queries is None:
            rows_by_space = method.memory_rows(pixel_values, task_id)
        else:
            rows_by_space = method.memory_rows(pixel_values, task_id, query=queries.to(device))
        for name, rows in rows_by_space.items():
            grams[name].add(rows)
    out = {name: accumulator.gram for name, accumulator in grams.items()}
    for name, prompts in method.prompt_terms().items():
        out[f"{name}__prompt_term"] = prompts.to(torch.float64).t() @ prompts.to(torch.float64)
    return out


@torch.no_grad()
def collect_reference_rows(
    model, batches: Iterable, task_id: int, memory_samples: int | None
) -> dict[str, torch.Tensor]:
    """Stream memory samples and return {space: (n_mem, F) flattened per-sample representations}."""
    device = next(model.parameters()).device
    rows: dict[str, list[torch.Tensor]] = {}
    for pixel_values in _batches(batches, memory_samples):
        for name, tensor in model.method.reference_rows(pixel_values.to(device), task_id).items():
            rows.setdefault(name, []).append(tensor.flatten(1).to(torch.float32).cpu())
    return {name: torch.cat(parts) for name, parts in rows.items()}


@torch.no_grad()
def update_memory(
    model,
    batches: Iterable,
    task_id: int,
    *,
    reduce_fn: ReduceFn | None = None,
    gather_fn: ReduceFn | None = None,
    query_lookup: QueryLookup | None = None,
) -> dict[str, BasisUpdate]:
    """Grow every protected space's basis from a task's memory samples.

    `reduce_fn` sums a tensor over processes (feature mode) and `gather_fn` concatenates rows over
    processes (reference mode), so every rank builds bit-identical bases from identical inputs.
    `query_lookup`: stored frozen queries by row id (feature mode; see `collect_feature_grams`).
    Returns {space: BasisUpdate}.
    """
    was_training = model.training
    model.eval()
    try:
        if model.config.projection_space == "feature":
            reduce_fn = reduce_fn or _identity
            grams = collect_feature_grams(
                model, batches, task_id, model.config.memory_samples, query_lookup=query_lookup
            )
            updates = {}
            for name in model.protected_spaces():
                gram = reduce_fn(grams[name])
                prompt_term = grams.get(f"{name}__prompt_term")
                updates[name] = model.memory.update_feature(
                    name, _check_finite(name, balanced_sum(gram, prompt_term)), model.method.threshold(name)
                )
            return updates
        gather_fn = gather_fn or _identity
        rows = collect_reference_rows(model, batches, task_id, model.config.memory_samples)
        rows = {
            name: gather_fn(matrix.to(next(model.parameters()).device)).cpu() for name, matrix in rows.items()
        }
        representations = model.method.reference_representations(rows, task_id)
        return {
            name: model.memory.update_reference(
                name, _check_finite(name, representation), model.method.threshold(name)
            )
            for name, representation in representations.items()
        }
    finally:
        model.train(was_training)


def memory_update_timing(model) -> str:
    """When the memory is updated: `"end"` of a task, or `"start"` (the reference L2P, with that task's
    samples and the previous prompts; the new projector is used from the next task on)."""
    return model.method.memory_timing()


class TaskMemorySchedule:
    """When the null-space memory grows around a task's training, per the method's `memory_timing()`.

    * `"end"` (default): after training, from the task's memory samples and the trained prompts;
    * `"start"` (the reference L2P): collected before training, with the task's samples and the previous
      prompts, but staged: training of this task still projects with the old bases, and the new ones
      take effect once the task's training is done (so from the next task on).

    `update(task_id)` runs the actual update (`ContinualTrainer.update_memory`: data, processes, checks).
    The trainer calls `before_training(t)` and `after_training(t)` around each task's `train()`.
    """

    def __init__(self, model, update: Callable[[int], Any]) -> None:
        self.model = model
        self.update = update
        self.timing = memory_update_timing(model)
        self._staged: dict[str, torch.Tensor] | None = None

    def before_training(self, task_id: int) -> None:
        if self.timing != "start" or not self.model.config.use_pgp:
            return
        memory = self.model.memory
        active = {key: value.clone() for key, value in memory.state_dict().items()}
        self.update(task_id)
        self._staged = {key: value.clone() for key, value in memory.state_dict().items()}
        memory.load_state_dict(active)

    def after_training(self, task_id: int) -> None:
        if self._staged is not None:
            self.model.memory.load_state_dict(self._staged)
            self._staged = None
        elif self.timing == "end":
            self.update(task_id)
