"""`QueryCache`: the frozen key-selection query of each image, computed once per run.

L2P and DualPrompt select prompts by the CLS feature of a frozen, unprompted pass over the image
(`VisionBackbone.query`). The backbone never trains and evaluation is not augmented, so that query
is a fixed function of the test image: evaluating every seen task after every task would otherwise
redo the same pass (T(T+1)/2 passes per test image in a T-task run instead of one). The same holds for
training images when the training transform is deterministic (no augmentation): every epoch after
the first reuses the queries.

Entries are keyed by a namespace (which split, under which transform) and the split's `row_id`, and
stored as one (rows, D) tensor per namespace on the model's device; which rows are filled is tracked
on the host, so a look-up never reads from the device. A query is computed for a whole batch exactly
as the uncached forward computes it, so results are the same bit for bit as long as the backbone
computes a row independently of the other rows of its batch (true for the batched matmuls and
attention of a ViT on CPU; on GPUs, kernels chosen per batch shape can differ in the last bits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


class QueryCache:
    """Frozen queries (D,) per (namespace, row id), on `device`; `max_bytes` caps the storage.

    Args:
        hidden_size: D.
        device: where the queries live (the model's device: a hit is an index, no copy).
        max_bytes: storage cap over all namespaces; rows beyond it are computed every time.
    """

    def __init__(self, hidden_size: int, device: torch.device | str = "cpu", max_bytes: int = 2**30) -> None:
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self._values: dict[str, torch.Tensor] = {}
        self._filled: dict[str, np.ndarray] = {}
        self.hits = 0  # rows served from the cache
        self.misses = 0  # rows computed

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored queries (all namespaces)."""
        return int(sum(values.numel() * values.element_size() for values in self._values.values()))

    def clear(self) -> None:
        self._values.clear()
        self._filled.clear()

    def _indices(self, row_ids: Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(row_ids, dtype=torch.long)
        if self.device.type == "cuda":
            # pinned + non_blocking: the copy is queued, the host does not wait for the device
            return index.pin_memory().to(self.device, non_blocking=True)
        return index.to(self.device)

    def lookup(self, namespace: str, row_ids: Sequence[int]) -> torch.Tensor | None:
        """(B, D) stored queries of `row_ids`, or None unless every row is stored."""
        filled = self._filled.get(namespace)
        if filled is None or not row_ids or max(row_ids) >= filled.size or not filled[list(row_ids)].all():
            return None
        return self._values[namespace].index_select(0, self._indices(row_ids))

    def store(self, namespace: str, row_ids: Sequence[int], queries: torch.Tensor) -> None:
        """Keep `queries` (B, D) for `row_ids` (if the storage cap allows)."""
        needed = max(row_ids) + 1
        values = self._values.get(namespace)
        if values is None or values.shape[0] < needed:
            old_bytes = 0 if values is None else values.numel() * values.element_size()
            row_bytes = self.hidden_size * queries.element_size()
            affordable = (self.max_bytes - (self.nbytes - old_bytes)) // row_bytes
            # Doubling amortises the copies; near the cap, grow only as far as the cap allows.
            capacity = min(max(needed, 2 * (0 if values is None else values.shape[0])), affordable)
            if capacity < needed:
                return
            grown = torch.zeros(capacity, self.hidden_size, dtype=queries.dtype, device=self.device)
            filled = np.zeros(capacity, dtype=bool)
            if values is not None:
                grown[: values.shape[0]] = values
                filled[: values.shape[0]] = self._filled[namespace]
            self._values[namespace], self._filled[namespace] = values, filled = grown, filled
        values.index_copy_(0, self._indices(row_ids), queries.detach().to(self.device, values.dtype))
        self._filled[namespace][list(row_ids)] = True

    def get_or_compute(
        self,
        namespace: str,
        row_ids: Sequence[int],
        pixel_values: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The stored queries of `row_ids`, or `compute(pixel_values)` (B, D) for the whole batch, stored."""
        stored = self.lookup(namespace, row_ids)
        if stored is not None:
            self.hits += len(row_ids)
            return stored.to(pixel_values.device)
        queries = compute(pixel_values)
        self.misses += len(row_ids)
        self.store(namespace, row_ids, queries)
        return queries
