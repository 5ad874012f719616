"""Tests for pgp_peft.projection: the null-space memory math (ALGORITHM §1-3, §7) and the reference fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pgp_peft.projection import (
    BasisUpdate,
    GramAccumulator,
    NullSpaceMemory,
    balanced_sum,
    check_reference_memory_size,
    feature_basis_update,
    project_out,
    project_update_,
    reference_basis_update,
    reference_pca,
)

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(dim: int, rank: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(dim, rank) random orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=_gen(seed), dtype=torch.float64))
    return q.to(dtype)


def _rows(num: int, dim: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    """(num, dim) rows with a geometrically decaying spectrum along a random orientation, so the energy
    cut-offs sit in well separated eigen-gaps."""
    g = _gen(seed)
    scales = decay ** torch.arange(dim, dtype=torch.float64)
    orientation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (torch.randn(num, dim, generator=g, dtype=torch.float64) * scales) @ orientation.T


def _gram(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ rows


def _share(basis: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(Q^T C Q) / tr(C) for an orthonormalised float64 copy Q of the basis."""
    if basis.shape[1] == 0:
        return 0.0
    q, _ = torch.linalg.qr(basis.to(torch.float64))
    return float(torch.trace(q.T @ gram @ q) / torch.trace(gram))


def _projector(basis: torch.Tensor) -> torch.Tensor:
    b = basis.to(torch.float64)
    return b @ b.T


def _assert_orthonormal(basis: torch.Tensor, atol: float) -> None:
    eye = torch.eye(basis.shape[1], dtype=torch.float64)
    gram = basis.to(torch.float64).T @ basis.to(torch.float64)
    assert torch.allclose(gram, eye, atol=atol), (gram - eye).abs().max()


# ----------------------------------------------------------------------------------------------------
# 1. project_out
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_out_removes_the_basis_component(dtype):
    basis = _orthonormal(32, 6, seed=1, dtype=dtype)
    g = torch.randn(7, 32, generator=_gen(2), dtype=dtype)
    g_proj = project_out(g, basis)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # g' U = 0, idempotent, non-expansive
    assert (g_proj @ basis).abs().max() < tol
    assert torch.allclose(project_out(g_proj, basis), g_proj, atol=tol)
    assert torch.all(g_proj.norm(dim=-1) <= g.norm(dim=-1) + tol)
    # and only the basis component went away: g - g' lies in span(U)
    removed = g - g_proj
    assert torch.allclose(removed @ basis @ basis.T, removed, atol=tol)
    assert g_proj.dtype == dtype


def test_project_out_is_invariant_to_basis_column_signs():
    basis = _orthonormal(24, 5, seed=3)
    flipped = basis * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    g = torch.randn(4, 24, generator=_gen(4), dtype=torch.float64)
    assert torch.allclose(project_out(g, basis), project_out(g, flipped), atol=1e-14)


def test_project_out_empty_basis_is_identity():
    g = torch.randn(3, 16, generator=_gen(5))
    out = project_out(g, torch.zeros(16, 0))
    assert torch.equal(out, g)


def test_project_out_leading_dims_match_row_by_row():
    basis = _orthonormal(12, 3, seed=6)
    g = torch.randn(2, 3, 5, 12, generator=_gen(7), dtype=torch.float64)
    expected = torch.stack([project_out(row, basis) for row in g.reshape(-1, 12)]).reshape(g.shape)
    assert torch.allclose(project_out(g, basis), expected, atol=1e-14)


def test_project_out_bf16_in_bf16_out_computed_in_float32():
    basis = _orthonormal(64, 10, seed=8, dtype=torch.float32)
    g = torch.randn(9, 64, generator=_gen(9)).to(torch.bfloat16)
    out = project_out(g, basis)
    assert out.dtype == torch.bfloat16
    expected = project_out(g.float(), basis).to(torch.bfloat16)
    assert torch.equal(out, expected)
    # the only leak left is the final bf16 rounding (8 mantissa bits)
    leak = (out.float() @ basis).norm() / out.float().norm()
    assert leak < 1e-2


def test_project_out_rejects_mismatched_dimension():
    with pytest.raises(ValueError, match="does not match"):
        project_out(torch.zeros(3, 10), torch.zeros(12, 2))


# ----------------------------------------------------------------------------------------------------
# GramAccumulator
# ----------------------------------------------------------------------------------------------------


def test_gram_accumulator_streams_rows():
    x = torch.randn(4, 9, 16, generator=_gen(10))  # (batch, tokens, D)
    acc = GramAccumulator(16)
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, 16).double()
    assert acc.num_rows == 36
    assert acc.gram.dtype == torch.float64 and acc.gram.shape == (16, 16)
    assert torch.allclose(acc.gram, flat.T @ flat, atol=1e-10)
    with pytest.raises(ValueError):
        acc.add(torch.zeros(3, 15))


# ----------------------------------------------------------------------------------------------------
# 2. feature_basis_update
# ----------------------------------------------------------------------------------------------------


def test_feature_first_update_keeps_smallest_sufficient_rank():
    gram = _gram(_rows(400, 32, seed=11))
    threshold = 0.9
    result = feature_basis_update(None, gram, threshold)
    assert isinstance(result, BasisUpdate)
    r = result.basis.shape[1]
    assert result.added == r and 0 < r < 32
    assert result.basis.dtype == torch.float32
    _assert_orthonormal(result.basis, atol=1e-6)
    # captured >= eps, and one column fewer would not be enough (the smallest such r)
    assert result.captured >= threshold
    assert _share(result.basis, gram) >= threshold - 1e-6
    assert _share(result.basis[:, : r - 1], gram) < threshold
    # the basis spans the top-r eigenvectors of C
    eigenvectors = torch.linalg.eigh(gram).eigenvectors.flip(1)[:, :r]
    assert torch.allclose(_projector(result.basis), _projector(eigenvectors), atol=1e-6)
    # decision trace: cumulative eigenvalue shares, non-decreasing, ending at 1
    trace = result.energy_trace
    assert trace.shape == (32,) and torch.all(trace[1:] >= trace[:-1]) and trace[-1] == 1.0
    assert trace[r - 1] >= threshold > trace[r - 2]


def test_feature_update_grows_with_old_columns_bitwise_unchanged():
    threshold = 0.9
    first = feature_basis_update(None, _gram(_rows(400, 32, seed=12)), threshold)
    # The next task's rows live in a different orientation: the old basis captures little of them.
    gram_2 = _gram(_rows(400, 32, seed=13))
    captured_before = _share(first.basis, gram_2)
    assert captured_before < threshold
    second = feature_basis_update(first.basis, gram_2, threshold)
    m = first.basis.shape[1]
    assert second.added > 0 and second.basis.shape[1] == m + second.added <= 32
    assert torch.equal(second.basis[:, :m], first.basis)
    _assert_orthonormal(second.basis, atol=1e-6)
    assert second.captured >= threshold
    assert _share(second.basis, gram_2) >= threshold - 1e-6
    # minimal: without the last new column the share is below the threshold
    assert _share(second.basis[:, :-1], gram_2) < threshold
    # trace = [captured_0, ..., captured_added]
    assert second.energy_trace.shape == (second.added + 1,)
    assert abs(float(second.energy_trace[0]) - captured_before) < 1e-6
    assert float(second.energy_trace[-1]) == pytest.approx(second.captured)


def test_feature_update_already_sufficient_basis_is_unchanged():
    gram = _gram(_rows(300, 24, seed=14))
    first = feature_basis_update(None, gram, 0.8)
    again = feature_basis_update(first.basis, gram, 0.8)
    assert again.added == 0
    assert torch.equal(again.basis, first.basis)
    assert again.energy_trace.shape == (1,)
    # a lower threshold never adds anything either
    assert feature_basis_update(first.basis, gram, 0.5).added == 0


def test_feature_threshold_one_on_full_rank_gives_all_columns():
    gram = _gram(_rows(200, 16, seed=15, decay=0.8))
    result = feature_basis_update(None, gram, 1.0)
    assert result.basis.shape == (16, 16)
    _assert_orthonormal(result.basis, atol=1e-6)
    # and it never goes beyond D when asked to grow further
    assert feature_basis_update(result.basis, _gram(_rows(200, 16, seed=16)), 1.0).basis.shape == (16, 16)


def test_feature_never_adds_zero_energy_directions():
    rows = _rows(100, 20, seed=17)[:, :20] @ torch.diag((torch.arange(20) < 5).double())  # rank 5
    result = feature_basis_update(None, _gram(rows), 1.0)
    assert result.basis.shape[1] == 5
    grown = feature_basis_update(result.basis[:, :2], _gram(rows), 1.0)
    assert grown.basis.shape[1] == 5


def test_feature_zero_gram_is_a_no_op():
    basis = _orthonormal(10, 3, seed=18, dtype=torch.float32)
    zero = torch.zeros(10, 10, dtype=torch.float64)
    result = feature_basis_update(basis, zero, 0.9)
    assert result.added == 0 and torch.equal(result.basis, basis)
    empty = feature_basis_update(None, zero, 0.9)
    assert empty.basis.shape == (10, 0)


def test_feature_growth_with_float64_basis_keeps_dtype_and_bits():
    first = feature_basis_update(None, _gram(_rows(300, 16, seed=19)), 0.7)
    old = first.basis.double()
    second = feature_basis_update(old, _gram(_rows(300, 16, seed=20)), 0.9)
    assert second.basis.dtype == torch.float64
    assert torch.equal(second.basis[:, : old.shape[1]], old)


def test_feature_rejects_bad_threshold():
    with pytest.raises(ValueError):
        feature_basis_update(None, torch.eye(4), 1.5)


# ----------------------------------------------------------------------------------------------------
# 3. order invariance (ALGORITHM §7.5)
# ----------------------------------------------------------------------------------------------------


def test_feature_mode_is_invariant_to_sample_order_and_batching():
    tasks = [_rows(600, 32, seed=21), _rows(600, 32, seed=22)]
    threshold = 0.9

    def run(order_seed: int | None, batch: int) -> torch.Tensor:
        basis = None
        for t, rows in enumerate(tasks):
            rows = rows.float()  # memory activations arrive in float32
            if order_seed is not None:
                rows = rows[torch.randperm(rows.shape[0], generator=_gen(order_seed + t))]
            acc = GramAccumulator(32)
            for chunk in rows.split(batch):
                acc.add(chunk.reshape(-1, 3, 32) if chunk.shape[0] % 3 == 0 else chunk)
            basis = feature_basis_update(basis, acc.gram, threshold).basis
        return basis

    reference = run(None, 64)
    for order_seed, batch in [(100, 7), (200, 600), (300, 1)]:
        other = run(order_seed, batch)
        assert other.shape == reference.shape
        assert torch.allclose(_projector(other), _projector(reference), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 4. balanced_sum
# ----------------------------------------------------------------------------------------------------


def test_balanced_sum_gives_the_prompt_term_the_token_trace():
    token = _gram(_rows(500, 16, seed=23))
    prompt = 1e-3 * _gram(_rows(10, 16, seed=24))
    total = balanced_sum(token, prompt)
    assert total.dtype == torch.float64
    # each term has trace tr(token): the prompt term is no longer drowned
    assert torch.trace(total - token) == pytest.approx(float(torch.trace(token)), rel=1e-12)
    assert torch.trace(total) == pytest.approx(2 * float(torch.trace(token)), rel=1e-12)
    # and the prompt term keeps its shape (only a scale changes)
    assert torch.allclose(balanced_sum(token, 1e6 * prompt), total, rtol=1e-10)
    # no prompt term -> the token Gram
    assert torch.equal(balanced_sum(token, None), token)
    assert torch.equal(balanced_sum(token, torch.zeros_like(token)), token)
    assert torch.equal(balanced_sum(token.float(), None), token.float().double())


# ----------------------------------------------------------------------------------------------------
# 5. reference fixtures (fixtures/reference_pgp/README.md §5)
# ----------------------------------------------------------------------------------------------------


def _fixture_dir() -> tuple[Path | None, list[Path]]:
    here = Path(__file__).resolve()
    candidates = []
    if os.environ.get("PGP_FIXTURES"):
        candidates.append(Path(os.environ["PGP_FIXTURES"]))
    candidates += [
        here.parent / "fixtures" / "reference_pgp",
        here.parents[2] / "shared" / "fixtures" / "reference_pgp",
    ]
    for candidate in candidates:
        if (candidate / "l2p.npz").is_file():
            return candidate, candidates
    return None, candidates


class Fixture:
    """One .npz: float32 inputs cast to float64 torch tensors, plus its meta JSON."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            self.arrays = {key: data[key] for key in data.files}
        self.meta = json.loads(str(self.arrays.pop("meta")))

    def __call__(self, key: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.arrays[key])).to(dtype)

    def int(self, key: str) -> int:
        return int(self.arrays[key])

    def float(self, key: str) -> float:
        return float(self.arrays[key])

    def __contains__(self, key: str) -> bool:
        return key in self.arrays


@pytest.fixture(scope="module")
def fixtures() -> dict[str, Fixture]:
    directory, tried = _fixture_dir()
    if directory is None:  # they ship in tests/fixtures: a missing copy is a broken checkout, not a skip
        pytest.fail(
            "reference PGP fixtures not found; set PGP_FIXTURES or provide one of: "
            + ", ".join(str(p) for p in tried)
        )
    return {name: Fixture(directory / f"{name}.npz") for name in ("l2p", "dualprompt", "clip", "edge_cases")}


ATOL = 1e-9


def _check_update(result: BasisUpdate, fx: Fixture, prefix: str, suffix: str, previous: torch.Tensor | None):
    """Column count, P, captured, energy trace and prefix of one update against the fixture."""
    expected_f = fx(f"{prefix}_F{suffix}")
    assert result.basis.shape == expected_f.shape
    assert torch.allclose(_projector(result.basis), fx(f"{prefix}_P{suffix}"), atol=ATOL)
    if previous is not None:
        assert torch.equal(result.basis[:, : previous.shape[1]], previous)
        assert result.added == expected_f.shape[1] - previous.shape[1]


def _pca_check(scores: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.allclose(scores, expected, atol=ATOL, rtol=0)
    assert scores.mean(dim=0).abs().max() < 1e-10
    idx = scores.abs().argmax(dim=0)
    assert torch.all(scores[idx, torch.arange(scores.shape[1])] > 0)


def test_fixture_meta_is_what_the_tests_assume(fixtures):
    for fx in fixtures.values():
        assert fx.meta["D"] == fx.meta["n_mem"] == 48 and fx.meta["n_tasks"] == 3
    assert fixtures["l2p"].meta["threshold_prompt"] == 0.5 and fixtures["l2p"].meta["threshold_key"] == 0.97


@pytest.mark.parametrize("task", [0, 1, 2])
def test_l2p_fixture_per_task(fixtures, task):
    fx = fixtures["l2p"]
    meta = fx.meta
    k_in, k_prompt, k_key = meta["pca_k_input"], meta["pca_k_prompt"], meta["pca_k_key"]
    t = f"t{task}"
    # PCA scores, sign included, and the sum R
    scores_in = reference_pca(fx(f"{t}_R_in"), k_in)
    _pca_check(scores_in, fx(f"{t}_R_in_pca"))
    representation = scores_in
    if task >= 1:
        pool = fx(f"{t}_prompt_pool")
        prompt_scores = reference_pca(
            pool.reshape(meta["pool_size"] * meta["prompt_length"], meta["D"]).T, k_prompt
        )
        _pca_check(prompt_scores, fx(f"{t}_prompt_pca"))
        representation = representation + prompt_scores
    else:
        assert f"{t}_prompt_pool" not in fx
    assert torch.allclose(representation, fx(f"{t}_R"), atol=ATOL, rtol=0)
    key_scores = reference_pca(fx(f"{t}_R_key"), k_key)
    _pca_check(key_scores, fx(f"{t}_R_key_pca"))

    # updates from the stored R and the stored previous F (no error carried between tasks)
    for suffix, threshold in (("", meta["threshold_prompt"]), ("_key", meta["threshold_key"])):
        previous = fx(f"t{task - 1}_F{suffix}") if task else None
        r_key = f"{t}_R" if suffix == "" else f"{t}_R_key_pca"
        result = reference_basis_update(fx(r_key), threshold, previous)
        _check_update(result, fx, t, suffix, previous)
        added_key = f"{t}_r_added" if suffix == "" else f"{t}_r_key_added"
        assert result.added == fx.int(added_key)
        assert result.captured == pytest.approx(fx.float(f"{t}_captured{suffix}"), abs=ATOL)
        assert torch.allclose(result.energy_trace, fx(f"{t}_energy_trace{suffix}"), atol=ATOL)
        if task == 0:
            assert result.captured < threshold
        else:
            assert result.captured >= threshold

    # projected gradients of task t+1: stored P and our own P both reproduce them
    for grad_key, suffix in (("grad_prompt", ""), ("grad_key", "_key")):
        g = fx(f"{t}_{grad_key}")
        expected = fx(f"{t}_{grad_key}_proj")
        assert torch.allclose(project_out(g, fx(f"{t}_F{suffix}")), expected, atol=ATOL)
        assert torch.allclose(g - g @ fx(f"{t}_P{suffix}"), expected, atol=ATOL)


def test_l2p_fixture_chain_end_to_end(fixtures):
    fx = fixtures["l2p"]
    meta = fx.meta
    prompt_basis = key_basis = None
    for task in range(3):
        t = f"t{task}"
        representation = reference_pca(fx(f"{t}_R_in"), meta["pca_k_input"])
        if task >= 1:
            pool = fx(f"{t}_prompt_pool").reshape(-1, meta["D"])
            representation = representation + reference_pca(pool.T, meta["pca_k_prompt"])
        prompt = reference_basis_update(representation, meta["threshold_prompt"], prompt_basis)
        key = reference_basis_update(
            reference_pca(fx(f"{t}_R_key"), meta["pca_k_key"]), meta["threshold_key"], key_basis
        )
        _check_update(prompt, fx, t, "", prompt_basis)
        _check_update(key, fx, t, "_key", key_basis)
        prompt_basis, key_basis = prompt.basis, key.basis
        # the gradient step of task t+1, with the chain's own bases
        assert torch.allclose(
            project_out(fx(f"{t}_grad_prompt"), prompt_basis), fx(f"{t}_grad_prompt_proj"), atol=ATOL
        )
        assert torch.allclose(
            project_out(fx(f"{t}_grad_key"), key_basis), fx(f"{t}_grad_key_proj"), atol=ATOL
        )
    assert (prompt_basis.shape[1], key_basis.shape[1]) == (5, 10)


@pytest.mark.parametrize("task", [0, 1, 2])
def test_dualprompt_fixture_per_task(fixtures, task):
    fx = fixtures["dualprompt"]
    meta = fx.meta
    t = f"t{task}"
    for layer in meta["layers"]:
        p = f"{t}_L{layer}"
        representation = reference_pca(fx(f"{p}_Q"), meta["pca_k"])
        _pca_check(representation, fx(f"{p}_R"))
        previous = fx(f"t{task - 1}_L{layer}_F") if task else None
        result = reference_basis_update(fx(f"{p}_R"), meta["threshold"], previous)
        _check_update(result, fx, p, "", previous)
        assert result.added == fx.int(f"{p}_r_added")
        assert result.captured == pytest.approx(fx.float(f"{p}_captured"), abs=ATOL)
        assert torch.allclose(result.energy_trace, fx(f"{p}_energy_trace"), atol=ATOL)
        # key half of a prefix (length, heads, head_dim): flattened row-major to (length, D) and projected
        g = fx(f"{p}_grad")
        length, heads, head_dim = g.shape
        assert (heads, head_dim) == (meta["num_heads"], meta["head_dim"])
        projected = project_out(g.reshape(length, heads * head_dim), fx(f"{p}_F")).reshape(g.shape)
        assert torch.allclose(projected, fx(f"{p}_grad_proj"), atol=ATOL)


def test_dualprompt_fixture_chain_end_to_end_through_memory(fixtures):
    """Both layers, PCA_20, through NullSpaceMemory (float64 storage, dotted names)."""
    fx = fixtures["dualprompt"]
    meta = fx.meta
    names = {layer: f"prefix.layer.{layer}.key" for layer in meta["layers"]}
    memory = NullSpaceMemory({name: meta["D"] for name in names.values()}, dtype=torch.float64)
    for task in range(3):
        for layer, name in names.items():
            p = f"t{task}_L{layer}"
            previous = memory.basis(name).clone() if memory.is_updated(name) else None
            memory.update_reference(name, reference_pca(fx(f"{p}_Q"), meta["pca_k"]), meta["threshold"])
            result_basis = memory.basis(name)
            assert result_basis.shape == fx(f"{p}_F").shape
            assert torch.allclose(_projector(result_basis), fx(f"{p}_P"), atol=ATOL)
            if previous is not None:
                assert torch.equal(result_basis[:, : previous.shape[1]], previous)
            g = fx(f"{p}_grad").clone()
            flat = g.view(g.shape[0], -1)
            memory.project_(flat, name)  # in place, on a view of g
            assert torch.allclose(g, fx(f"{p}_grad_proj"), atol=ATOL)
    assert memory.ranks() == {name: 5 for name in names.values()}


@pytest.mark.parametrize("task", [0, 1, 2])
def test_clip_fixture_per_task(fixtures, task):
    fx = fixtures["clip"]
    meta = fx.meta
    t = f"t{task}"
    scores_in = reference_pca(fx(f"{t}_R_in"), meta["pca_k_input"])
    _pca_check(scores_in, fx(f"{t}_R_in_pca"))
    # the prompt term is added on every task, including task 0, and uses prompt^T (D x L)
    prompt_scores = reference_pca(fx(f"{t}_prompt").T, meta["pca_k_prompt"])
    _pca_check(prompt_scores, fx(f"{t}_prompt_pca"))
    assert torch.allclose(scores_in + prompt_scores, fx(f"{t}_R"), atol=ATOL, rtol=0)
    previous = fx(f"t{task - 1}_F") if task else None
    result = reference_basis_update(fx(f"{t}_R"), meta["threshold"], previous)
    _check_update(result, fx, t, "", previous)
    assert result.added == fx.int(f"{t}_r_added")
    assert result.captured == pytest.approx(fx.float(f"{t}_captured"), abs=ATOL)
    assert torch.allclose(result.energy_trace, fx(f"{t}_energy_trace"), atol=ATOL)
    g = fx(f"{t}_grad")
    projected = project_out(g, fx(f"{t}_F"))
    assert torch.allclose(projected, fx(f"{t}_grad_proj"), atol=ATOL)
    # README §5.4 on the real vectors: orthogonal, idempotent, non-expansive, sign invariant
    basis = fx(f"{t}_F")
    assert (projected @ basis).abs().max() < 1e-12
    assert torch.allclose(project_out(projected, basis), projected, atol=1e-14)
    assert projected.norm() <= g.norm()
    assert torch.allclose(project_out(g, -basis), projected, atol=1e-14)


def test_clip_fixture_chain_end_to_end(fixtures):
    fx = fixtures["clip"]
    meta = fx.meta
    basis = None
    for task in range(3):
        t = f"t{task}"
        representation = reference_pca(fx(f"{t}_R_in"), meta["pca_k_input"]) + reference_pca(
            fx(f"{t}_prompt").T, meta["pca_k_prompt"]
        )
        result = reference_basis_update(representation, meta["threshold"], basis)
        _check_update(result, fx, t, "", basis)
        basis = result.basis
        assert torch.allclose(project_out(fx(f"{t}_grad"), basis), fx(f"{t}_grad_proj"), atol=ATOL)
    assert basis.shape == (48, 6)


def test_clip_fixture_prompt_term_matters(fixtures):
    """Dropping the prompt term changes the ranks (README §3.3): the test above would catch it."""
    fx = fixtures["clip"]
    meta = fx.meta
    basis = None
    ranks = []
    for task in range(3):
        scores = reference_pca(fx(f"t{task}_R_in"), meta["pca_k_input"])
        basis = reference_basis_update(scores, meta["threshold"], basis).basis
        ranks.append(basis.shape[1])
    assert ranks != [1, 3, 6]


def test_edge_case_empty_first_basis(fixtures):
    fx = fixtures["edge_cases"]
    threshold = fx.meta["threshold"]
    result = reference_basis_update(fx("a_R"), threshold, None)
    assert result.basis.shape == fx("a_F").shape == (48, 0)
    assert result.added == 0
    assert torch.allclose(result.energy_trace, fx("a_energy_trace"), atol=ATOL)
    assert float(result.energy_trace[0]) >= threshold  # sigma^4 share of the top component
    assert torch.equal(project_out(fx("a_R").T, result.basis), fx("a_R").T)  # identity
    # a sigma^2 (GPM-style) energy rule would have kept one column: the fixture guards that mistake
    s = torch.linalg.svdvals(fx("a_R"))
    assert (
        int((torch.cumsum(s**2, 0) / (s**2).sum() < threshold).sum()) == fx.int("a_r_if_sigma2_energy") == 1
    )


def test_edge_case_later_branch_on_empty_basis(fixtures):
    fx = fixtures["edge_cases"]
    threshold = fx.meta["threshold"]
    empty = reference_basis_update(fx("a_R"), threshold, None).basis
    result = reference_basis_update(fx("a2_R"), threshold, empty)
    assert result.energy_trace[0] == 0.0  # acc_0 = 0: the later branch ran
    assert result.basis.shape == fx("a2_F").shape == (48, 1)
    assert torch.allclose(_projector(result.basis), fx("a2_P"), atol=ATOL)
    assert torch.allclose(result.energy_trace, fx("a2_energy_trace"), atol=ATOL)
    # the first-call branch on the same R is a different computation (full cumsum trace)
    assert reference_basis_update(fx("a2_R"), threshold, None).energy_trace.shape == (48,)


def test_edge_case_unchanged_basis(fixtures):
    fx = fixtures["edge_cases"]
    threshold = fx.meta["threshold"]
    first = reference_basis_update(fx("b_R0"), threshold, None)
    assert first.basis.shape == (48, 1)
    assert torch.allclose(_projector(first.basis), fx("b_P0"), atol=ATOL)
    assert torch.allclose(first.energy_trace, fx("b_energy_trace0"), atol=ATOL)
    stored = fx("b_F0")
    result = reference_basis_update(fx("b_R1"), threshold, stored)
    assert result.added == 0
    assert torch.equal(result.basis, stored) and torch.equal(fx("b_F1"), stored)
    assert torch.allclose(result.energy_trace, fx("b_energy_trace1"), atol=ATOL)
    assert torch.allclose(_projector(result.basis), fx("b_P1"), atol=ATOL)


def test_reference_float32_path_matches_ranks_and_projectors(fixtures):
    """The reference itself ran in float32 (README §6): same ranks, P within 1e-5, scores within 1e-4."""
    f32 = torch.float32

    def pca32(x: torch.Tensor, k: int, expected: torch.Tensor) -> torch.Tensor:
        scores = reference_pca(x, k)
        assert scores.dtype == f32
        assert (scores.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
        return scores

    def check(result: BasisUpdate, expected_p: torch.Tensor, expected_f: torch.Tensor) -> torch.Tensor:
        assert result.basis.dtype == f32
        assert result.basis.shape == expected_f.shape
        assert torch.allclose(_projector(result.basis), expected_p, atol=1e-5)
        return result.basis

    fx = fixtures["l2p"]
    m = fx.meta
    prompt_basis = key_basis = None
    for task in range(3):
        t = f"t{task}"
        rep = pca32(fx(f"{t}_R_in", f32), m["pca_k_input"], fx(f"{t}_R_in_pca"))
        if task:
            pool = fx(f"{t}_prompt_pool", f32).reshape(-1, m["D"])
            rep = rep + pca32(pool.T, m["pca_k_prompt"], fx(f"{t}_prompt_pca"))
        prompt_basis = check(
            reference_basis_update(rep, m["threshold_prompt"], prompt_basis), fx(f"{t}_P"), fx(f"{t}_F")
        )
        key_rep = pca32(fx(f"{t}_R_key", f32), m["pca_k_key"], fx(f"{t}_R_key_pca"))
        key_basis = check(
            reference_basis_update(key_rep, m["threshold_key"], key_basis), fx(f"{t}_P_key"), fx(f"{t}_F_key")
        )
        projected = project_out(fx(f"{t}_grad_prompt", f32), prompt_basis)
        assert torch.allclose(projected.double(), fx(f"{t}_grad_prompt_proj"), atol=1e-5)

    fx = fixtures["dualprompt"]
    m = fx.meta
    for layer in m["layers"]:
        basis = None
        for task in range(3):
            p = f"t{task}_L{layer}"
            rep = pca32(fx(f"{p}_Q", f32), m["pca_k"], fx(f"{p}_R"))
            basis = check(reference_basis_update(rep, m["threshold"], basis), fx(f"{p}_P"), fx(f"{p}_F"))

    fx = fixtures["clip"]
    m = fx.meta
    basis = None
    for task in range(3):
        t = f"t{task}"
        rep = pca32(fx(f"{t}_R_in", f32), m["pca_k_input"], fx(f"{t}_R_in_pca"))
        rep = rep + pca32(fx(f"{t}_prompt", f32).T, m["pca_k_prompt"], fx(f"{t}_prompt_pca"))
        basis = check(reference_basis_update(rep, m["threshold"], basis), fx(f"{t}_P"), fx(f"{t}_F"))
        assert torch.allclose(
            project_out(fx(f"{t}_grad", f32), basis).double(), fx(f"{t}_grad_proj"), atol=1e-5
        )

    fx = fixtures["edge_cases"]
    threshold = fx.meta["threshold"]
    empty = reference_basis_update(fx("a_R", f32), threshold, None).basis
    assert empty.shape == (48, 0)
    check(reference_basis_update(fx("a2_R", f32), threshold, empty), fx("a2_P"), fx("a2_F"))
    b0 = check(reference_basis_update(fx("b_R0", f32), threshold, None), fx("b_P0"), fx("b_F0"))
    assert torch.equal(reference_basis_update(fx("b_R1", f32), threshold, b0).basis, b0)


def test_reference_pca_rejects_too_many_components():
    with pytest.raises(ValueError, match=r"num_components=50.*\(48, 300\)"):
        reference_pca(torch.zeros(48, 300), 50)
    with pytest.raises(ValueError):
        reference_pca(torch.zeros(100, 10), 11)


def test_reference_pca_sign_rule():
    x = torch.randn(30, 8, generator=_gen(25), dtype=torch.float64)
    scores = reference_pca(x, 4)
    assert torch.allclose(reference_pca(-x, 4), scores, atol=1e-12)  # sign of the data does not matter
    # matches U S of the centred data up to one sign per column
    centred = x - x.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    assert torch.allclose(scores.abs(), (u[:, :4] * s[:4]).abs(), atol=1e-12)
    # in each score column the largest-|.| entry is positive (sklearn 1.3's U-based svd_flip)
    idx = scores.abs().argmax(dim=0)
    assert torch.all(scores[idx, torch.arange(4)] > 0)


# ----------------------------------------------------------------------------------------------------
# 6. NullSpaceMemory
# ----------------------------------------------------------------------------------------------------


def test_memory_state_dict_round_trip_and_stable_shapes():
    spaces = {"l2p.prompt": 16, "l2p.key": 16, "prefix.0.head_0": 8}
    memory = NullSpaceMemory(spaces)
    assert memory.is_empty() and memory.names == list(spaces)
    shapes_before = {k: v.shape for k, v in memory.state_dict().items()}
    assert "basis__l2p_prompt" in shapes_before and shapes_before["basis__l2p_prompt"] == (16, 16)

    memory.update_feature("l2p.prompt", _gram(_rows(200, 16, seed=26)), 0.9)
    memory.update_feature("prefix.0.head_0", _gram(_rows(200, 8, seed=27)), 0.7)
    memory.update_feature("l2p.prompt", _gram(_rows(200, 16, seed=28)), 0.9)  # grows
    assert not memory.is_empty()
    state = memory.state_dict()
    assert {k: v.shape for k, v in state.items()} == shapes_before

    fresh = NullSpaceMemory(spaces)
    fresh.load_state_dict(state)
    assert fresh.ranks() == memory.ranks() and fresh.ranks()["l2p.key"] == 0
    for name in spaces:
        assert torch.equal(fresh.basis(name), memory.basis(name))
        assert fresh.is_updated(name) == memory.is_updated(name)
    # padding beyond rank stays zero
    r = memory.rank("l2p.prompt")
    assert torch.all(state["basis__l2p_prompt"][:, r:] == 0)


def test_memory_saves_each_basis_as_its_kept_columns():
    """An adapter file holds a (D, r) basis per space; the zero-padded (D, D) of older files loads too;
    a mis-shaped basis is refused naming it, before any space is written."""
    spaces = {"l2p.prompt": 16, "l2p.key": 16, "prefix.0.head_0": 8}
    memory = NullSpaceMemory(spaces)
    memory.update_feature("l2p.prompt", _gram(_rows(200, 16, seed=26)), 0.9)
    memory.update_feature("prefix.0.head_0", _gram(_rows(200, 8, seed=27)), 0.7)
    saved = memory.saved_state()
    ranks = memory.ranks()
    assert saved["basis__l2p_prompt"].shape == (16, ranks["l2p.prompt"]) and 0 < ranks["l2p.prompt"] < 16
    assert saved["basis__l2p_key"].shape == (16, 0)  # never updated: nothing to store
    for state in (saved, memory.state_dict()):  # compact, and the padded form of pgp_peft 0.1/0.2 files
        fresh = NullSpaceMemory(spaces)
        fresh.load_saved_state({k: v.clone() for k, v in state.items()})
        assert fresh.ranks() == ranks
        for name, buffer in memory.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], buffer), name
    damaged = dict(saved, basis__prefix_0_head_0=torch.zeros(8, 5))  # rank says otherwise
    fresh = NullSpaceMemory(spaces)
    with pytest.raises(ValueError, match=r"memory.basis__prefix_0_head_0' has shape \(8, 5\)"):
        fresh.load_saved_state(damaged, "adapter.safetensors")
    assert fresh.is_empty()  # the valid first space was not written either
    with pytest.raises(ValueError, match="must be an integer scalar"):
        fresh.load_saved_state(dict(saved, updated__l2p_key=torch.zeros(2, dtype=torch.bool)))
    assert fresh.is_empty()


def test_memory_update_feature_matches_function_and_is_idempotent():
    memory = NullSpaceMemory({"x": 12})
    gram = _gram(_rows(100, 12, seed=29))
    direct = feature_basis_update(None, gram, 0.8)
    result = memory.update_feature("x", gram, 0.8)
    assert torch.equal(memory.basis("x"), direct.basis) and result.added == direct.added
    before = memory.basis("x").clone()
    again = memory.update_feature("x", gram, 0.8)  # the update returns a view of the buffer itself
    assert again.added == 0 and torch.equal(memory.basis("x"), before)


def test_memory_rejects_colliding_names_and_bad_shapes():
    with pytest.raises(ValueError, match="collides"):
        NullSpaceMemory({"a.b": 4, "a_b": 4})
    memory = NullSpaceMemory({"a": 4})
    with pytest.raises(ValueError):
        memory.set_basis("a", torch.zeros(5, 1))
    with pytest.raises(KeyError):
        memory.basis("missing")


def test_memory_project_heads_is_row_major_per_head():
    heads, head_dim = 4, 8
    names = [f"layer.0.head.{h}" for h in range(heads)]
    memory = NullSpaceMemory({name: head_dim for name in names})
    for h, name in enumerate(names):
        if h != 2:  # head 2 stays unprotected
            memory.set_basis(name, _orthonormal(head_dim, h + 1, seed=30 + h, dtype=torch.float32))
    # the key half of a prefix (2, length, H * head_dim): a strided slice, projected in place
    prefix = torch.randn(2, 5, heads * head_dim, generator=_gen(31))
    key_half = prefix[0]
    value_before = prefix[1].clone()
    expected = key_half.reshape(5, heads, head_dim).clone()
    for h, name in enumerate(names):
        expected[:, h] = project_out(expected[:, h], memory.basis(name))
    memory.project_heads_(key_half, names)
    assert torch.allclose(prefix[0], expected.reshape(5, -1), atol=1e-6)
    assert torch.equal(prefix[1], value_before)  # the value half is untouched
    for h, name in enumerate(names):
        if memory.rank(name):
            assert (prefix[0].reshape(5, heads, head_dim)[:, h] @ memory.basis(name)).abs().max() < 1e-5
    # a column-major split (reshape(..., head_dim, H)) would give a different answer
    column_major = (
        torch.randn(2, 5, heads * head_dim, generator=_gen(31))[0].reshape(5, head_dim, heads).clone()
    )
    for h, name in enumerate(names):
        column_major[:, :, h] = project_out(column_major[:, :, h], memory.basis(name))
    assert not torch.allclose(column_major.reshape(5, -1), prefix[0], atol=1e-3)


def test_memory_project_with_shared_basis_over_heads():
    memory = NullSpaceMemory({"shared": 6})
    memory.set_basis("shared", _orthonormal(6, 2, seed=32, dtype=torch.float32))
    g = torch.randn(3, 18, generator=_gen(33))
    expected = project_out(g.reshape(3, 3, 6), memory.basis("shared")).reshape(3, 18)
    memory.project_(g, "shared", num_heads=3)
    assert torch.allclose(g, expected, atol=1e-6)
    with pytest.raises(ValueError):
        memory.project_(torch.zeros(3, 18), "shared", num_heads=2)


def test_memory_reference_first_call_survives_state_dict(fixtures):
    fx = fixtures["edge_cases"]
    threshold = fx.meta["threshold"]
    memory = NullSpaceMemory({"clip.image_prompt": 48})
    first = memory.update_reference("clip.image_prompt", fx("a_R"), threshold)
    assert first.energy_trace.shape == (48,)  # the feature=None branch
    assert memory.rank("clip.image_prompt") == 0 and memory.is_updated("clip.image_prompt")
    assert memory.is_empty()

    fresh = NullSpaceMemory({"clip.image_prompt": 48})
    fresh.load_state_dict(memory.state_dict())
    assert fresh.is_updated("clip.image_prompt")
    later = fresh.update_reference("clip.image_prompt", fx("a2_R"), threshold)
    # rank 0 but updated -> the later branch with acc_0 = 0, as the reference
    assert torch.allclose(later.energy_trace, fx("a2_energy_trace"), atol=ATOL)
    assert fresh.rank("clip.image_prompt") == 1
    assert torch.allclose(_projector(fresh.basis("clip.image_prompt")), fx("a2_P"), atol=1e-6)

    never = NullSpaceMemory({"clip.image_prompt": 48})
    assert never.update_reference("clip.image_prompt", fx("a2_R"), threshold).energy_trace.shape == (48,)


# ----------------------------------------------------------------------------------------------------
# 7. check_reference_memory_size
# ----------------------------------------------------------------------------------------------------


def test_check_reference_memory_size():
    check_reference_memory_size(768, 768)
    with pytest.raises(
        ValueError, match=r"(?s)memory_samples=500.*hidden_size=768.*projection_space='feature'"
    ):
        check_reference_memory_size(500, 768)
    memory = NullSpaceMemory({"p": 16})
    with pytest.raises(ValueError, match="20"):
        memory.update_reference("p", torch.randn(20, 5), 0.5)


# ----------------------------------------------------------------------------------------------------
# 8. project_update_ (ALGORITHM §2 step 5)
# ----------------------------------------------------------------------------------------------------


def _relative_leak(delta: torch.Tensor, basis: torch.Tensor) -> float:
    return float((delta.double() @ basis.double()).norm() / delta.double().norm())


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_adam_leaks_through_projected_gradients_and_project_update_fixes_it(dtype, bound):
    dim, rank, steps = 32, 8, 5
    basis = _orthonormal(dim, rank, seed=34, dtype=dtype)
    init = torch.empty(10, dim, dtype=dtype).uniform_(-1, 1, generator=_gen(35))
    grads = [torch.randn(10, dim, generator=_gen(36 + s), dtype=dtype) for s in range(steps)]

    def train(optimizer_cls, project_update: bool) -> torch.Tensor:
        param = torch.nn.Parameter(init.clone())
        optimizer = optimizer_cls([param], lr=1e-2)
        for grad in grads:
            param.grad = project_out(grad, basis)  # gradient projection (ALGORITHM §2 step 4)
            before = param.detach().clone()
            optimizer.step()
            if project_update:
                project_update_(param.data, before, lambda delta: project_out(delta, basis))
        return param.detach() - init

    # Adam's per-coordinate scaling turns a projected gradient into an update that leaks into span(U)
    adam_raw = _relative_leak(train(torch.optim.Adam, project_update=False), basis)
    assert adam_raw > 1e-3
    # projecting the actual change restores the guarantee
    adam_projected = _relative_leak(train(torch.optim.Adam, project_update=True), basis)
    assert adam_projected < bound
    # SGD needs no help: its update is a multiple of the projected gradient
    assert _relative_leak(train(torch.optim.SGD, project_update=False), basis) < bound


def test_project_update_accepts_in_place_project_fn():
    basis = _orthonormal(6, 2, seed=40)
    before = torch.randn(4, 6, generator=_gen(41), dtype=torch.float64)
    param = before + torch.randn(4, 6, generator=_gen(42), dtype=torch.float64)
    expected = before + project_out(param - before, basis)

    def in_place(delta: torch.Tensor) -> None:
        delta.copy_(project_out(delta, basis))

    project_update_(param, before, in_place)
    assert torch.allclose(param, expected, atol=1e-14)


def test_cached_ranks_follow_every_way_a_rank_buffer_changes():
    memory = NullSpaceMemory({"a": 4})
    assert memory.rank("a") == 0
    memory.set_basis("a", torch.eye(4)[:, :2])
    assert memory.rank("a") == 2 and memory.basis("a").shape == (4, 2)
    other = NullSpaceMemory({"a": 4})
    other.set_basis("a", torch.eye(4)[:, :3])
    memory.load_state_dict(other.state_dict())
    assert memory.rank("a") == 3
    memory.rank__a.copy_(torch.tensor(1))  # e.g. a broadcast from rank 0
    assert memory.rank("a") == 1
    memory.to(torch.float64)
    assert memory.rank("a") == 1 and memory.basis("a").dtype == torch.float32
