"""Building the null-space memory at a task boundary: what each protected space "sees".

Streams a task's memory samples through the model (no grad, eval mode) and hands the resulting
representations to `projection.py`:

* feature mode (default, docs/ALGORITHM.md §2): per space a D x D Gram matrix of token rows, summed over
  batches (and over processes with `reduce_fn`), plus the old prompts' Gram for prompt spaces;
* reference mode (§3): one flattened row per memory sample, PCA-reduced as in the authors' code.

Which rows protect which space:
    L2P        prompt       <- tokens entering layer 0 (CLS + patches with position) + old prompts
               key          <- frozen CLS queries
    DualPrompt prefix_l*_h* <- queries of head h at prefix layer l (prompted pass, the task's slot)
    CLIP       image_prompt <- vision embeddings (CLS + patches with position) + the image prompt

Reference mode reproduces the reference pipeline's inputs too: the memory samples go through the
training transform (every method: the reference draws them from its training loader), and
DualPrompt's memory pass picks E-prompts as the reference's does (`_reference_prefix_slots`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .projection import BasisUpdate, GramAccumulator, balanced_sum, reference_pca
from .prompts import select_by_key

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


def _record_prefix_queries(model, pixel_values: torch.Tensor, task_id: int, recorder) -> None:
    """DualPrompt: a prompted pass with the task's own E-prompt slots, recording the queries.

    The slots are known (the prompt mask), so the frozen query pass that key selection needs is
    skipped; beyond the pool (more tasks than slots) the slots are chosen by key as in training.
    """
    slots = model._task_slot(task_id, pixel_values.shape[0], pixel_values.device, use_task_slot=True)
    if slots is None:
        model.forward_features(pixel_values, task_id, query_recorder=recorder, use_task_slot=True)
        return
    prefixes = model.prefix_pool.prefixes(pixel_values.shape[0], slots)
    model.backbone(pixel_values, prefixes=prefixes, query_recorder=recorder)


def _reference_prefix_slots(model, pixel_values: torch.Tensor) -> torch.Tensor | None:
    """(B, k) E-prompt slots of the reference's DualPrompt memory pass, or None without E-prompts.

    The reference calls `model(input)` in eval mode there, with neither the task id nor the frozen
    model's CLS features: the prompt mask is off, and each sample (its memory loader has batch size
    1, so no batch-wise vote) selects its slots by key against the fallback query of its EPrompt,
    the token-wise max of the embedded input (CLS + patches, with position embeddings).
    """
    if model.prefix_pool is None or model.prefix_pool.e_key is None:
        return None
    query = model.backbone.embeddings(pixel_values).amax(dim=1)  # (B, N, D) -> (B, D)
    return select_by_key(query, model.prefix_pool.e_key, model.config.top_k).indices


def _record_reference_prefix_queries(model, pixel_values: torch.Tensor, recorder) -> None:
    """DualPrompt, reference mode: a prompted pass with the slots the reference's memory pass uses."""
    slots = _reference_prefix_slots(model, pixel_values)
    prefixes = model.prefix_pool.prefixes(pixel_values.shape[0], slots)
    model.backbone(pixel_values, prefixes=prefixes, query_recorder=recorder)


def _prompt_rows(model) -> torch.Tensor | None:
    """The current prompts as rows (n, D): the p_t of the condition p_t Δpᵀ = 0."""
    if model.prompt_pool is not None:
        return model.prompt_pool.prompt.detach().reshape(-1, model.hidden_size)
    if model.image_prompt is not None:
        return model.image_prompt.prompt.detach()
    return None


@torch.no_grad()
def collect_feature_grams(
    model,
    batches: Iterable,
    task_id: int,
    memory_samples: int | None,
    query_lookup: QueryLookup | None = None,
) -> dict[str, torch.Tensor]:
    """Stream memory samples and return {space: D x D Gram matrix (float64)} of what each space sees.

    `query_lookup` (L2P): stored frozen queries of a batch's rows (the training query cache): the key
    space's rows then come from it and the prompt space's from the embeddings alone, instead of a
    whole backbone pass."""
    spaces = model.protected_spaces()
    device = next(model.parameters()).device
    grams = {name: GramAccumulator(dim, device=device) for name, dim in spaces.items()}
    method = model.config.method
    heads = model.backbone.num_heads

    def record_queries(layer: int, query: torch.Tensor) -> None:
        # query (B, H, N, d): head h protects the prefix keys of head h against these rows.
        names = model.prefix_space_names(layer)
        if layer not in model.config.g_prompt_layers and layer not in model.config.e_prompt_layers:
            return
        for head, name in enumerate(names):
            grams[name].add(query[:, head] if len(names) == heads else query.transpose(1, 2).flatten(2))

    for pixel_values, rows in _batches_with_rows(batches, memory_samples):
        pixel_values = pixel_values.to(device)
        if method == "l2p":
            queries = query_lookup(rows) if (query_lookup is not None and rows) else None
            if queries is not None:
                grams["prompt"].add(model.backbone.embeddings(pixel_values))
                grams["key"].add(queries)
                continue
            tokens: list[torch.Tensor] = []
            hidden = model.backbone(pixel_values, token_recorder=tokens.append)
            grams["prompt"].add(tokens[0])
            grams["key"].add(hidden[:, 0])
        elif method == "clip":
            tokens = []
            model.forward_features(pixel_values, task_id, token_recorder=tokens.append)
            grams["image_prompt"].add(tokens[0])
        else:
            _record_prefix_queries(model, pixel_values, task_id, record_queries)
    out = {name: accumulator.gram for name, accumulator in grams.items()}
    prompts = _prompt_rows(model)
    if prompts is not None:
        name = "prompt" if method == "l2p" else "image_prompt"
        out[f"{name}__prompt_term"] = prompts.to(torch.float64).t() @ prompts.to(torch.float64)
    return out


@torch.no_grad()
def collect_reference_rows(
    model, batches: Iterable, task_id: int, memory_samples: int | None
) -> dict[str, torch.Tensor]:
    """Stream memory samples and return {space: (n_mem, F) flattened per-sample representations}."""
    device = next(model.parameters()).device
    method = model.config.method
    rows: dict[str, list[torch.Tensor]] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        rows.setdefault(name, []).append(tensor.flatten(1).to(torch.float32).cpu())

    prefix_layers = set(model.config.g_prompt_layers) | set(model.config.e_prompt_layers)

    def record_queries(layer: int, query: torch.Tensor) -> None:
        if layer in prefix_layers:
            add(f"prefix_l{layer}", query)  # (B, H, N, d) flattened row-major, as the reference

    for pixel_values in _batches(batches, memory_samples):
        pixel_values = pixel_values.to(device)
        if method == "l2p":
            vision = model.backbone.vision
            add("prompt", vision.embeddings.patch_embeddings(pixel_values))
            add("key", model.backbone.query(pixel_values))
        elif method == "clip":
            tokens: list[torch.Tensor] = []
            model.backbone(pixel_values, token_recorder=tokens.append)
            add("image_prompt", tokens[0])
        else:
            _record_reference_prefix_queries(model, pixel_values, record_queries)
    return {name: torch.cat(parts) for name, parts in rows.items()}


def reference_representations(model, rows: dict[str, torch.Tensor], task_id: int) -> dict[str, torch.Tensor]:
    """PCA-reduce per-sample rows as the reference does (docs/ALGORITHM.md §3 table), adding the prompt terms."""
    widths = model.config.reference_pca_components
    out: dict[str, torch.Tensor] = {}
    method = model.config.method
    for name, matrix in rows.items():
        matrix = matrix.to(torch.float64)
        if method == "l2p" and name == "prompt":
            representation = reference_pca(matrix, widths["prompt"])
            if task_id >= 1:  # the prompt term starts at the second task in the reference
                pool = _prompt_rows(model).to(torch.float64).cpu()  # (P·L, D)
                representation = representation + reference_pca(pool.t(), widths["prompt"])
        elif method == "l2p" and name == "key":
            representation = reference_pca(matrix, widths["key"])
        elif method == "clip":
            prompt = _prompt_rows(model).to(torch.float64).cpu()  # (L, D), added on every task
            representation = reference_pca(matrix, widths["clip"]) + reference_pca(prompt.t(), widths["clip"])
        else:
            representation = reference_pca(matrix, min(widths["prefix"], *matrix.shape))
        out[name] = representation
    return out


def threshold_for(model, space: str) -> float:
    return model.config.key_threshold if space == "key" else model.config.prompt_threshold


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
    `query_lookup`: stored frozen queries by row id (feature mode, L2P; see `collect_feature_grams`).
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
                    name, _check_finite(name, balanced_sum(gram, prompt_term)), threshold_for(model, name)
                )
            return updates
        gather_fn = gather_fn or _identity
        rows = collect_reference_rows(model, batches, task_id, model.config.memory_samples)
        rows = {
            name: gather_fn(matrix.to(next(model.parameters()).device)).cpu() for name, matrix in rows.items()
        }
        representations = reference_representations(model, rows, task_id)
        return {
            name: model.memory.update_reference(
                name, _check_finite(name, representation), threshold_for(model, name)
            )
            for name, representation in representations.items()
        }
    finally:
        model.train(was_training)


def memory_update_timing(model) -> str:
    """When the reference updates the memory: L2P at the start of a task (with that task's samples and
    the previous prompts; the new projector is used from the next task on), the others at its end."""
    if model.config.projection_space == "reference" and model.config.method == "l2p":
        return "start"
    return "end"
