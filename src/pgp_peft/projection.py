"""Null-space memory for Prompt Gradient Projection (PGP).

The math of `docs/ALGORITHM.md`:

- §1: a protected space is spanned by the orthonormal columns of a basis U (D x r); a gradient (or an
  update) g is made orthogonal to it with g <- g - g U U^T on its last (embedding) axis (`project_out`).
- §2, feature mode (default): stream the memory samples' token rows x_i into the Gram matrix
  C = sum_i x_i^T x_i (`GramAccumulator`), optionally add the old prompts' Gram at equal trace
  (`balanced_sum`), and grow U from the eigenvectors of C until it captures a share eps of the
  energy tr(C) (`feature_basis_update`).
- §3, reference mode: the authors' `update_memory` on PCA-reduced, sample-major representation matrices
  (`reference_pca`, `reference_basis_update`), reproducing the fixtures in `fixtures/reference_pgp/`.
- `NullSpaceMemory` keeps the named bases as buffers, so they travel with `state_dict` / safetensors.

Pure torch: no numpy, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BasisUpdate",
    "GramAccumulator",
    "NullSpaceMemory",
    "balanced_sum",
    "check_reference_memory_size",
    "feature_basis_update",
    "project_out",
    "project_update_",
    "reference_basis_update",
    "reference_pca",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to do linear algebra in: the widest input dtype, but at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"The energy threshold must lie in [0, 1], got {threshold}.")
    return threshold


# ----------------------------------------------------------------------------------------------------
# Projection (ALGORITHM §1, §2 steps 4-5)
# ----------------------------------------------------------------------------------------------------


def project_out(tensor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the component of `tensor` that lies in span(basis): g' = g - (g U) U^T.

    Args:
        tensor: (..., D), projected along its last axis.
        basis: (D, r) with orthonormal columns. r == 0 means nothing is protected.

    Returns:
        (..., D) in `tensor`'s dtype. For r == 0 the input itself is returned (no copy).
        Half / bfloat16 inputs are projected in float32 and cast back: computing g U U^T with 8 mantissa
        bits would leave a visible component inside the protected space.
    """
    if basis.ndim != 2:
        raise ValueError(f"basis must be 2-D (D, r), got shape {tuple(basis.shape)}.")
    if tensor.shape[-1] != basis.shape[0]:
        raise ValueError(
            f"Last axis of tensor ({tensor.shape[-1]}) does not match the basis dimension ({basis.shape[0]})."
        )
    if basis.shape[1] == 0:
        return tensor
    dtype = _compute_dtype(tensor, basis)
    g = tensor.to(dtype)
    u = basis.to(device=tensor.device, dtype=dtype)
    # Two skinny matmuls (r << D) instead of building the D x D projector.
    projected = g - (g @ u) @ u.T
    return projected.to(tensor.dtype)


@torch.no_grad()
def project_update_(
    param: torch.Tensor,
    param_before: torch.Tensor,
    project_fn: Callable[[torch.Tensor], torch.Tensor | None],
) -> None:
    """`project_update=True` (ALGORITHM §2 step 5): param <- before + P_perp(param - before), in place.

    Adam rescales every coordinate, so a projected gradient does not give a projected update. Projecting
    the actual change after `optimizer.step()` restores x_t Δp^T = 0 for any optimizer.

    Args:
        param: the parameter (or a slice of it) after the optimizer step, modified in place.
        param_before: a copy of the same tensor taken before the step, same shape.
        project_fn: maps a delta (..., D) to its projection; it may work in place and return None.
    """
    if param.shape != param_before.shape:
        raise ValueError(
            f"param {tuple(param.shape)} and param_before {tuple(param_before.shape)} differ in shape."
        )
    # Take the difference at >= float32 so a bf16 parameter's small step is not rounded to zero first.
    dtype = _compute_dtype(param)
    before = param_before.to(device=param.device, dtype=dtype)
    delta = param.to(dtype) - before
    projected = project_fn(delta)
    if projected is None:
        projected = delta
    param.copy_((before + projected.to(dtype)).to(param.dtype))


# ----------------------------------------------------------------------------------------------------
# Feature mode (ALGORITHM §2)
# ----------------------------------------------------------------------------------------------------


class GramAccumulator:
    """Streams token rows and accumulates C = sum_i x_i^T x_i (D x D, float64) without storing rows.

    The sum is order independent up to float64 rounding, which is what makes feature mode invariant to
    the order of memory samples (ALGORITHM §7.5).
    """

    # Rows converted to float64 per matmul: bounds the temporary copy (65536 x 768 x 8 B = 400 MB max).
    _CHUNK_ROWS = 65536

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}.")
        self.dim = int(dim)
        # device=None: follow the device of the first rows added (no host round trip for GPU activations).
        self._follow_rows = device is None
        self._gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self._num_rows = 0

    @property
    def gram(self) -> torch.Tensor:
        """C, (D, D) float64."""
        return self._gram

    @property
    def num_rows(self) -> int:
        """Number of token rows added so far (including the merged accumulators')."""
        return self._num_rows

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> None:
        """Add rows (..., D); all leading axes (batch, tokens, ...) are flattened into rows."""
        if rows.shape[-1] != self.dim:
            raise ValueError(f"Expected rows with last axis {self.dim}, got shape {tuple(rows.shape)}.")
        if self._follow_rows and self._num_rows == 0:
            self._gram = self._gram.to(rows.device)
        rows = rows.detach().reshape(-1, self.dim)
        for chunk in rows.split(self._CHUNK_ROWS):
            x = chunk.to(device=self._gram.device, dtype=torch.float64)
            self._gram.addmm_(x.T, x)
        self._num_rows += rows.shape[0]


def balanced_sum(token_gram: torch.Tensor, prompt_gram: torch.Tensor | None) -> torch.Tensor:
    """The "sum space" of ALGORITHM §2 step 2: token Gram + old prompts' Gram at equal trace.

    A task streams hundreds of thousands of token rows but there are only ~50 prompt rows, so a plain sum
    would drown the prompt term. Choice: each term is scaled so its trace equals tr(token_gram), i.e. the
    token term is kept as is and the prompt term is multiplied by tr(token_gram) / tr(prompt_gram); the
    energy threshold then sees half of the energy from each term.

    Args:
        token_gram: (D, D), sum of x_i^T x_i over the memory token rows.
        prompt_gram: (D, D), p^T p over the old prompt rows, or None.

    Returns:
        (D, D) float64. `token_gram` (as float64) when there is no prompt term (None or zero trace);
        `prompt_gram` when the token term has zero trace (nothing else to balance against).
    """
    token = token_gram.to(torch.float64)
    if prompt_gram is None:
        return token
    if prompt_gram.shape != token_gram.shape:
        raise ValueError(
            f"prompt_gram {tuple(prompt_gram.shape)} and token_gram {tuple(token_gram.shape)} differ in shape."
        )
    prompt = prompt_gram.to(device=token.device, dtype=torch.float64)
    token_trace = torch.trace(token)
    prompt_trace = torch.trace(prompt)
    if prompt_trace == 0:
        return token
    if token_trace == 0:
        return prompt
    return token + prompt * (token_trace / prompt_trace)


@dataclass
class BasisUpdate:
    """What one basis update did (for logging and tests)."""

    basis: torch.Tensor
    """(D, r_new), orthonormal columns; the old columns come first, unchanged."""
    added: int
    """Number of columns appended by this update."""
    captured: float
    """Share of the energy captured by the updated basis (feature mode: the share the decision used,
    tr(U^T C U) / tr(C) up to rounding; reference mode: 1 - ||G - F F^T G||_F^2 / ||G||_F^2)."""
    energy_trace: torch.Tensor
    """The cumulative shares the decision looked at: the full cumsum on a first update,
    [captured_0, captured_1, ..., captured_added] on a later one (fixtures README §3.5)."""


def _fix_column_signs(columns: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-|.| entry positive (first index on ties), so eigenvector signs are
    deterministic across LAPACK / cuSOLVER builds. (..., n, k) -> same."""
    idx = columns.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(columns.gather(-2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return columns * signs


def _descending_eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, largest first. (D, D) -> (D,), (D, D)."""
    sym = 0.5 * (sym + sym.T)  # remove the rounding asymmetry before eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    return eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)


def _num_to_keep(cumulative: torch.Tensor, threshold: float, num_nonzero: int) -> int:
    """Smallest r with cumulative[r - 1] >= threshold, never counting zero-energy directions."""
    if threshold <= 0.0:
        return 0
    r = int((cumulative < threshold).sum().item()) + 1
    return min(r, num_nonzero)


def feature_basis_update(basis: torch.Tensor | None, gram: torch.Tensor, threshold: float) -> BasisUpdate:
    """Grow the basis of a protected space from its Gram matrix (ALGORITHM §2 step 3).

    The energy of a direction v is v^T C v, so the eigenvalues of C are the sigma^2 energies of the rows.
    - First update (basis None or 0 columns): keep the top r eigenvectors of C, r the smallest count whose
      cumulative share of tr(C) is >= threshold.
    - Later update: captured = tr(U^T C U) / tr(C). If < threshold, append the top eigenvectors of the
      residual (I - U U^T) C (I - U U^T) until the share is >= threshold.

    Directions with (numerically) zero energy are never added, so the basis never exceeds rank(C) <= D
    columns; with tr(C) == 0 the basis is returned unchanged. Appended columns are re-orthonormalised
    against the old ones, whose values are kept bit for bit.

    Args:
        basis: (D, r_old) with orthonormal columns, or None.
        gram: (D, D) symmetric PSD, e.g. `GramAccumulator.gram` or `balanced_sum(...)`.
        threshold: energy share eps in [0, 1].

    Returns:
        A `BasisUpdate` whose basis is (D, r_new) on gram's device, in the dtype of the given basis
        (float32 for a first update: bases are applied to float32 gradients). All the linear algebra runs
        in float64.
    """
    threshold = _check_threshold(threshold)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (D, D), got shape {tuple(gram.shape)}.")
    dim = gram.shape[0]
    device = gram.device
    if basis is None:
        basis = torch.zeros(dim, 0, dtype=torch.float32, device=device)
    if basis.ndim != 2 or basis.shape[0] != dim:
        raise ValueError(f"basis must be (D={dim}, r), got shape {tuple(basis.shape)}.")
    out_dtype = basis.dtype if basis.is_floating_point() else torch.float32
    basis = basis.to(device=device, dtype=out_dtype)
    num_old = basis.shape[1]

    c = gram.to(torch.float64)
    total = torch.trace(c)
    empty_trace = torch.zeros(0, dtype=torch.float64, device=device)
    if total <= 0:
        # Nothing to protect: the (zero) energy is trivially all captured.
        return BasisUpdate(basis=basis, added=0, captured=1.0, energy_trace=empty_trace)

    eigenvalues_c, eigenvectors_c = _descending_eigh(c)
    # Numerical rank cut-off as in `torch.linalg.matrix_rank`: eigenvalues below it are rounding noise.
    zero_tol = dim * torch.finfo(torch.float64).eps * eigenvalues_c[0]

    if num_old == 0:
        # ---- first update: top eigenvectors of C ----
        num_nonzero = int((eigenvalues_c > zero_tol).sum().item())
        eigenvalues = torch.where(eigenvalues_c > zero_tol, eigenvalues_c, torch.zeros_like(eigenvalues_c))
        # Divide by the last cumsum entry so a full basis has a share of exactly 1.0 (threshold 1.0 works).
        cumulative = eigenvalues.cumsum(0)
        cumulative = cumulative / cumulative[-1]
        r = _num_to_keep(cumulative, threshold, num_nonzero)
        new_columns = _fix_column_signs(eigenvectors_c[:, :r])
        new_basis = new_columns.to(out_dtype)
        captured = float(cumulative[r - 1]) if r > 0 else 0.0
        return BasisUpdate(basis=new_basis, added=r, captured=captured, energy_trace=cumulative)

    # ---- later update ----
    # The protected space is span(U). An exactly orthonormal float64 basis of it (U may be stored in
    # float32) makes I - Q Q^T an exact projector, so no energy inside span(U) leaks into the residual.
    q_old, _ = torch.linalg.qr(basis.to(torch.float64))
    captured_0 = float(torch.trace(q_old.T @ c @ q_old) / total)
    if captured_0 >= threshold or num_old >= dim:
        trace = torch.tensor([captured_0], dtype=torch.float64, device=device)
        return BasisUpdate(basis=basis, added=0, captured=captured_0, energy_trace=trace)

    complement = torch.eye(dim, dtype=torch.float64, device=device) - q_old @ q_old.T
    eigenvalues_res, eigenvectors_res = _descending_eigh(complement @ c @ complement)
    num_nonzero = min(int((eigenvalues_res > zero_tol).sum().item()), dim - num_old)
    eigenvalues_res = torch.where(
        eigenvalues_res > zero_tol, eigenvalues_res, torch.zeros_like(eigenvalues_res)
    )
    # acc_i = captured_0 + (energy of the first i residual directions) / tr(C). The residual holds exactly
    # 1 - captured_0 of the energy; normalising by its own sum keeps the full share at exactly 1.0.
    residual_cumulative = eigenvalues_res.cumsum(0)
    if residual_cumulative[-1] > 0:
        residual_cumulative = residual_cumulative / residual_cumulative[-1]
    accumulated = captured_0 + (1.0 - captured_0) * residual_cumulative
    r = _num_to_keep(accumulated, threshold, num_nonzero)
    trace = torch.cat([accumulated.new_tensor([captured_0]), accumulated[:r]])
    if r == 0:
        return BasisUpdate(basis=basis, added=0, captured=captured_0, energy_trace=trace)

    # Re-orthonormalise the new directions against span(U) (two Gram-Schmidt passes: "twice is enough"),
    # then among themselves (QR); they are orthogonal already up to rounding, so this only cleans up.
    new_columns = eigenvectors_res[:, :r]
    for _ in range(2):
        new_columns = new_columns - q_old @ (q_old.T @ new_columns)
    q_new = _fix_column_signs(torch.linalg.qr(new_columns).Q)
    new_basis = torch.cat([basis, q_new.to(out_dtype)], dim=1)
    return BasisUpdate(basis=new_basis, added=r, captured=float(accumulated[r - 1]), energy_trace=trace)


# ----------------------------------------------------------------------------------------------------
# Reference-compatible mode (ALGORITHM §3, fixtures/reference_pgp/README.md)
# ----------------------------------------------------------------------------------------------------


def reference_pca(x: torch.Tensor, num_components: int) -> torch.Tensor:
    """sklearn-1.3 `PCA(k, svd_solver='full').fit(x).transform(x)`, written out.

    Centre the columns, SVD, keep the top k scores U_k S_k, and flip each score column so its largest-|.|
    entry is positive (first index on ties; sklearn 1.3's U-based `svd_flip`). sklearn >= 1.5 flips by
    component rows instead, which changes the reference's summed matrices, hence no library call here.

    Args:
        x: (n, F) samples x features.
        num_components: k, 0 <= k <= min(n, F).

    Returns:
        (n, k) scores, in x's dtype (at least float32).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}.")
    n, f = x.shape
    if not 0 <= num_components <= min(n, f):
        raise ValueError(
            f"PCA needs 0 <= num_components <= min(n_samples, n_features); got num_components="
            f"{num_components} for x of shape ({n}, {f})."
        )
    x = x.to(_compute_dtype(x))
    centred = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    scores = u[:, :num_components] * s[:num_components]
    return _fix_column_signs(scores)


def reference_basis_update(
    representation: torch.Tensor, threshold: float, basis: torch.Tensor | None
) -> BasisUpdate:
    """The reference `update_memory` / `update_memory_prefix` (fixtures README §3).

    G = R R^T (n x n, in sample space); the energies are the squared singular values of G (sigma^4 of R).
    - First call (basis is None): keep r = #{i : cumsum(S_i^2) / sum(S^2) < threshold} leading left
      singular vectors of G; the kept share is below the threshold and r may be 0 (an (n, 0) basis).
    - Later call (basis given, even with 0 columns): acc_0 = 1 - ||G - F F^T G||_F^2 / ||G||_F^2; while
      acc < threshold, append the next left singular vector of G - F F^T G and add S_hat_i^2 / ||G||_F^2.
      Old columns are kept bit for bit (hstack, no re-orthonormalisation, as in the reference); the
      basis is truncated to n columns.

    Args:
        representation: R, (n, k); one row per memory sample.
        threshold: energy share in [0, 1].
        basis: F, (n, m), or None on the first call.

    Returns:
        A `BasisUpdate` in R's dtype (at least float32; pass float64 to match the fixtures to 1e-12).
        `captured` is 1 - ||G - F F^T G||_F^2 / ||G||_F^2 for the returned F. `energy_trace` is the full
        cumsum on a first call, [acc_0, ..., acc_r] on a later one. A zero R returns the basis unchanged
        (an (n, 0) basis on a first call), as the reference's NaN comparisons do.
    """
    threshold = _check_threshold(threshold)
    if representation.ndim != 2:
        raise ValueError(f"representation must be 2-D (n_samples, k), got {tuple(representation.shape)}.")
    n = representation.shape[0]
    dtype = _compute_dtype(representation) if basis is None else _compute_dtype(representation, basis)
    r_mat = representation.to(dtype)
    if basis is not None:
        if basis.ndim != 2 or basis.shape[0] != n:
            raise ValueError(f"basis must be (n={n}, m), got shape {tuple(basis.shape)}.")
        basis = basis.to(device=r_mat.device, dtype=dtype)

    gram = r_mat @ r_mat.T

    def captured_share(features: torch.Tensor) -> float:
        residual = gram - features @ (features.T @ gram)
        return float(1.0 - residual.square().sum() / gram.square().sum())

    u, s, _ = torch.linalg.svd(gram, full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total == 0:
        unchanged = basis if basis is not None else r_mat.new_zeros(n, 0)
        return BasisUpdate(basis=unchanged, added=0, captured=1.0, energy_trace=r_mat.new_zeros(0))

    if basis is None:
        cumulative = torch.cumsum(energy / total, dim=0)
        r = int((cumulative < threshold).sum().item())
        features = u[:, :r]
        return BasisUpdate(
            basis=features, added=r, captured=captured_share(features), energy_trace=cumulative
        )

    # Later call: the left singular vectors of the part of G that F does not explain yet.
    residual = gram - basis @ (basis.T @ gram)
    u_hat, s_hat, _ = torch.linalg.svd(residual, full_matrices=False)
    ratio = s_hat.square() / total
    accumulated = float((total - s_hat.square().sum()) / total)
    trace = [accumulated]
    r = 0
    for share in ratio.tolist():
        if accumulated >= threshold:
            break
        accumulated += share
        trace.append(accumulated)
        r += 1
    energy_trace = torch.tensor(trace, dtype=dtype, device=r_mat.device)
    if r == 0:
        return BasisUpdate(basis=basis, added=0, captured=captured_share(basis), energy_trace=energy_trace)
    features = torch.cat([basis, u_hat[:, :r]], dim=1)[:, :n]
    added = features.shape[1] - basis.shape[1]
    return BasisUpdate(
        basis=features, added=added, captured=captured_share(features), energy_trace=energy_trace
    )


def check_reference_memory_size(memory_samples: int, hidden_size: int) -> None:
    """Reference mode needs n_mem == D; raise a ValueError explaining why otherwise."""
    if memory_samples != hidden_size:
        raise ValueError(
            f"projection_space='reference' needs memory_samples == hidden_size, got memory_samples="
            f"{memory_samples} and hidden_size={hidden_size}. The reference builds its basis in sample "
            f"space (a {memory_samples} x {memory_samples} projector) and applies it to the embedding axis "
            f"of size {hidden_size}, which only type-checks when the two are equal. Use "
            f"projection_space='feature', or set memory_samples={hidden_size}."
        )


# ----------------------------------------------------------------------------------------------------
# The memory module
# ----------------------------------------------------------------------------------------------------


class NullSpaceMemory(nn.Module):
    """The protected spaces of a model and their bases, kept as buffers (saved in `state_dict`).

    Space `name` of dimension D is stored as:
    - `basis__{key}`: (D, D), the basis in its first r columns, zero padded, so state_dict shapes do not
      change from task to task and a fresh module can load any checkpoint;
    - `rank__{key}`: int64 scalar, r;
    - `updated__{key}`: bool scalar, whether the space was ever updated. Reference mode tells a first
      update (F = None) from a later one with an empty (n, 0) basis, so rank 0 alone is not enough.

    `key` is `name` with "." replaced by "_" (buffer names cannot contain dots); `names` keeps the
    original names and two names that sanitise to the same key are rejected.
    """

    def __init__(self, spaces: dict[str, int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._dtype = dtype
        self._rank_cache: dict[str, tuple[tuple[int, int], int]] = {}
        self._keys: dict[str, str] = {}
        self._dims: dict[str, int] = {}
        for name, dim in spaces.items():
            key = name.replace(".", "_")
            if not key:
                raise ValueError("Space names must be non-empty.")
            if key in self._keys.values():
                raise ValueError(
                    f"Space name {name!r} collides with another name after replacing '.' by '_'."
                )
            if int(dim) <= 0:
                raise ValueError(f"Space {name!r} needs a positive dimension, got {dim}.")
            self._keys[name] = key
            self._dims[name] = int(dim)
            self.register_buffer(f"basis__{key}", torch.zeros(dim, dim, dtype=dtype))
            self.register_buffer(f"rank__{key}", torch.zeros((), dtype=torch.int64))
            self.register_buffer(f"updated__{key}", torch.zeros((), dtype=torch.bool))

    def _apply(self, fn, recurse: bool = True):
        # `model.to(torch.bfloat16)` must not round the bases: a bf16 basis leaks ~1e-3 of every
        # projected gradient back into the protected space. Devices follow; the dtype stays.
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != originals[name].dtype:
                self._buffers[name] = originals[name].to(buffer.device)
        return self

    # ---- lookup ----

    @property
    def names(self) -> list[str]:
        """The space names, in construction order."""
        return list(self._keys)

    def _buffers_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self._keys:
            raise KeyError(f"Unknown protected space {name!r}; known: {self.names}.")
        key = self._keys[name]
        return getattr(self, f"basis__{key}"), getattr(self, f"rank__{key}"), getattr(self, f"updated__{key}")

    def dim(self, name: str) -> int:
        """D of space `name`."""
        self._buffers_of(name)
        return self._dims[name]

    def rank(self, name: str) -> int:
        """Number of basis columns r of space `name`."""
        # `.item()` on a CUDA buffer synchronises the device, and the projection asks for every space's
        # rank on every step. Cache it per (storage, version): any in-place write to the buffer
        # (set_basis, load_state_dict, a broadcast) bumps the version, a move makes a new storage.
        rank = self._buffers_of(name)[1]
        key = (rank.data_ptr(), rank._version)
        cached = self._rank_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = int(rank.item())
        self._rank_cache[name] = (key, value)
        return value

    def ranks(self) -> dict[str, int]:
        return {name: self.rank(name) for name in self._keys}

    def is_updated(self, name: str) -> bool:
        """Whether space `name` has ever been updated (or set)."""
        return bool(self._buffers_of(name)[2].item())

    def basis(self, name: str) -> torch.Tensor:
        """(D, r) view of the stored basis of space `name`."""
        return self._buffers_of(name)[0][:, : self.rank(name)]

    def is_empty(self) -> bool:
        """True when no space has a basis column, i.e. projection is the identity everywhere."""
        return all(rank == 0 for rank in self.ranks().values())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {self.rank(name)}/{self._dims[name]}" for name in self._keys)

    # ---- saving ----

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The buffers as an adapter file stores them: each basis cut to its r columns, (D, r).

        The zero padding of the (D, D) buffer is not written: at ViT-B it is 2.3 MB per space whatever the
        rank (a LoRA-PGP adapter protects 24 spaces), while the kept columns are what the rank says."""
        state: dict[str, torch.Tensor] = {}
        for name, key in self._keys.items():
            basis, rank, updated = self._buffers_of(name)
            state[f"basis__{key}"] = basis[:, : self.rank(name)]
            state[f"rank__{key}"] = rank
            state[f"updated__{key}"] = updated
        return state

    @torch.no_grad()
    def load_saved_state(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load `saved_state()`: a (D, r) basis per space, r its stored rank. The zero-padded (D, D) bases
        that pgp_peft 0.1 wrote load too. Raises `ValueError` naming the tensor otherwise."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"{source}: memory tensors {sorted(set(state))} do not match the protected spaces {sorted(expected)}"
            )
        bases: dict[str, torch.Tensor] = {}
        for name, key in self._keys.items():  # every space checked before any is written
            stored_rank, updated = state[f"rank__{key}"], state[f"updated__{key}"]
            if (
                stored_rank.ndim
                or stored_rank.is_floating_point()
                or updated.ndim
                or updated.dtype != torch.bool
            ):
                raise ValueError(
                    f"{source}: 'memory.rank__{key}' must be an integer scalar and 'memory.updated__{key}' a "
                    f"bool scalar, got {stored_rank.dtype} {tuple(stored_rank.shape)} and {updated.dtype} "
                    f"{tuple(updated.shape)}"
                )
            basis, rank = state[f"basis__{key}"], int(stored_rank)
            dim = self._dims[name]
            if (
                not 0 <= rank <= dim
                or basis.ndim != 2
                or basis.shape[0] != dim
                or basis.shape[1] not in (rank, dim)
            ):
                raise ValueError(
                    f"{source}: tensor 'memory.basis__{key}' has shape {tuple(basis.shape)} with rank {rank}; "
                    f"space {name!r} needs ({dim}, {rank}) (or the zero-padded ({dim}, {dim}) of older files)"
                )
            bases[name] = basis[:, :rank]
        for name, key in self._keys.items():
            self.set_basis(name, bases[name])
            self._buffers_of(name)[2].copy_(state[f"updated__{key}"])

    # ---- updates ----

    @torch.no_grad()
    def set_basis(self, name: str, basis: torch.Tensor) -> None:
        """Store a (D, r) basis for space `name` (orthonormality is the caller's responsibility)."""
        buffer, rank, updated = self._buffers_of(name)
        dim = self._dims[name]
        if basis.ndim != 2 or basis.shape[0] != dim or basis.shape[1] > dim:
            raise ValueError(f"Space {name!r} needs a (D={dim}, r <= {dim}) basis, got {tuple(basis.shape)}.")
        r = basis.shape[1]
        # Clone first: `basis` may be a view of `buffer` itself (an update that added nothing).
        new = basis.detach().to(device=buffer.device, dtype=buffer.dtype).clone()
        buffer[:, r:].zero_()
        buffer[:, :r].copy_(new)
        rank.fill_(r)
        updated.fill_(True)

    def update_feature(self, name: str, gram: torch.Tensor, threshold: float) -> BasisUpdate:
        """Feature-mode update (ALGORITHM §2 step 3) of space `name` from its Gram matrix (D, D)."""
        current = self.basis(name)
        result = feature_basis_update(current, gram, threshold)
        self.set_basis(name, result.basis)
        return result

    def update_reference(self, name: str, representation: torch.Tensor, threshold: float) -> BasisUpdate:
        """Reference-mode update (ALGORITHM §3) of space `name` from R (n_mem, k), computed in float64.

        The first call on a space (never updated) is the reference's `feature=None` branch; every later
        call, even on an empty basis, takes the residual branch.
        """
        check_reference_memory_size(representation.shape[0], self.dim(name))
        current = self.basis(name).to(torch.float64) if self.is_updated(name) else None
        result = reference_basis_update(representation.to(torch.float64), threshold, current)
        self.set_basis(name, result.basis)
        return result

    # ---- projection ----

    @torch.no_grad()
    def project_(self, tensor: torch.Tensor, name: str, num_heads: int = 1) -> None:
        """g <- g - g U U^T in place, on the last axis of tensor (..., D_total).

        With num_heads > 1 the last axis is split row-major into num_heads chunks (reshape(..., H, D)) and
        every chunk is projected with the same basis of space `name` (D = D_total // num_heads).
        Use `project_heads_` for one space per head.
        """
        self.project_heads_(tensor, [name] * num_heads)

    @torch.no_grad()
    def project_heads_(self, tensor: torch.Tensor, names: Sequence[str]) -> None:
        """Per-head projection in place: tensor (..., H * D) is viewed as (..., H, D) (row-major heads) and
        head h is projected with the basis of space names[h]."""
        num_heads = len(names)
        if num_heads == 0:
            raise ValueError("names must list at least one space.")
        total = tensor.shape[-1]
        if total % num_heads:
            raise ValueError(f"Last axis {total} does not split into {num_heads} equal heads.")
        head_dim = total // num_heads
        for name in names:
            if self.dim(name) != head_dim:
                raise ValueError(
                    f"Space {name!r} has dimension {self.dim(name)}, but each of the {num_heads} chunks of "
                    f"the last axis ({total}) has {head_dim}."
                )
        # `view` (not reshape): splitting the last axis is always a view, so the writes land in `tensor`.
        heads = tensor.view(*tensor.shape[:-1], num_heads, head_dim)
        for h, name in enumerate(names):
            basis = self.basis(name)
            if basis.shape[1] == 0:
                continue
            heads[..., h, :].copy_(project_out(heads[..., h, :], basis))
