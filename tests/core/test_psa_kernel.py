"""PSA's kernel: stable for every tau > 0, blocked for large groups, equal to a direct softmax.

docs/algorithm.md section 5a: the softmax subtracts the row maximum and is defined for every
tau > 0; as tau -> 0 it tends to equal weights over the most similar candidates, as
tau -> inf to the group mean. Section 3: cost per group, and (issue 20) memory bounded by
blocks of rows, never m x m for a large group.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from proxmo.core import Scope, StepBatch, dense_features, resolve_config, tfidf_features
from proxmo.core import step as step_module
from proxmo.core.config import Normalization
from proxmo.core.step import StateFeatures, exact_anchor_advantages, soft_aggregation

from .helpers import run, traj
from .test_worked_examples import E7_RETURNS, E7_STATES

TINY_TAUS = [1e-300, 1e-310, 5e-324, 1e-30, 1e-12]  # 1e-310 and 5e-324 are subnormal
HUGE_TAUS = [1e12, 1e300, 1.7976931348623157e308]  # the last is the largest float64


def _e7_batch(*, with_twin: bool = False) -> StepBatch:
    states = list(E7_STATES)
    returns = list(E7_RETURNS)
    if with_twin:  # "cabinet 2" has cabinet 1's TF-IDF vector (one-character tokens dropped)
        states.append(E7_STATES[0].replace("cabinet 1", "cabinet 2"))
        returns.append(1.0)
    return StepBatch.from_trajectories(
        [traj(f"r{i}", "g", [s], [g]) for i, (s, g) in enumerate(zip(states, returns, strict=True))]
    )


def _psa(batch: StepBatch, tau: float, scope: Scope = Scope.GROUP) -> tuple[np.ndarray, np.ndarray]:
    """PSA over TF-IDF with every floating-point warning an error: the kernel must not warn."""
    features = tfidf_features(batch)
    assert features is not None
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return soft_aggregation(batch.rewards.copy(), batch, features, tau, scope)


def _direct(
    returns: np.ndarray, vectors: np.ndarray, groups: np.ndarray, tau: float
) -> tuple[np.ndarray, np.ndarray]:
    """The definition, row by row: W_i = softmax over i's group of x_i . x_j / tau."""
    advantages, effective = np.empty(len(returns)), np.empty(len(returns))
    for i in range(len(returns)):
        members = np.flatnonzero(groups == groups[i])
        logits = vectors[members] @ vectors[i] / tau
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        advantages[i] = returns[i] - weights @ returns[members]
        effective[i] = 1.0 / np.sum(weights**2)
    return advantages, effective


# --- tau at its extremes ------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TINY_TAUS)
def test_tiny_tau_is_exact_grouping(tau: float) -> None:
    # E7's texts have distinct TF-IDF vectors but r0 = r2: the limit is GiGPO's MEAN anchors
    batch = _e7_batch()
    advantages, effective = _psa(batch, tau)
    assert np.all(np.isfinite(advantages)) and np.all(np.isfinite(effective))
    np.testing.assert_allclose(advantages, [4.75, 0.0, -4.75, 0.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(effective, [2.0, 1.0, 2.0, 1.0])


@pytest.mark.parametrize("tau", TINY_TAUS)
def test_tiny_tau_weighs_tied_candidates_equally(tau: float) -> None:
    # "cabinet 2" ties with "cabinet 1" (cosine 1.0): equal weights over the three rows
    batch = _e7_batch(with_twin=True)
    advantages, effective = _psa(batch, tau)
    tied = [0, 2, 4]
    mean = np.mean(np.asarray(batch.rewards)[tied])
    np.testing.assert_allclose(advantages[tied], np.asarray(batch.rewards)[tied] - mean, atol=1e-12)
    np.testing.assert_allclose(advantages[[1, 3]], 0.0, atol=1e-12)
    np.testing.assert_array_equal(effective, [3.0, 1.0, 3.0, 1.0, 3.0])


@pytest.mark.parametrize("tau", HUGE_TAUS)
def test_huge_tau_is_the_group_mean(tau: float) -> None:
    batch = _e7_batch()
    advantages, effective = _psa(batch, tau)
    returns = np.asarray(E7_RETURNS)
    np.testing.assert_allclose(advantages, returns - returns.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(effective, 4.0, rtol=1e-12)


@pytest.mark.parametrize("tau", [*TINY_TAUS, 0.01, 0.1, 1.0, *HUGE_TAUS])
@pytest.mark.parametrize("scope", ["GROUP", "SAME_STEP"])
def test_every_preset_answer_is_finite_for_every_tau(tau: float, scope: str) -> None:
    trajs = [
        traj("a", "g", [E7_STATES[0], E7_STATES[1], "!!"], [0.0, 0.0, 10.0]),
        traj("b", "g", [E7_STATES[0], E7_STATES[3]], [0.0, 0.0]),
        traj("c", "h", [E7_STATES[2]], [1.0]),
    ]
    for similarity in ("TFIDF", "ENCODER"):
        cfg = resolve_config("paper", {"tau": tau, "scope": scope, "similarity": similarity})
        with warnings.catch_warnings(), np.errstate(all="raise"):
            warnings.simplefilter("error")
            _, result = run(trajs, cfg)
        for values in (
            result.advantages,
            result.step_advantages,
            result.groups.mean_effective_neighbors,
        ):
            assert np.all(np.isfinite(values)), (similarity, values)


def test_worked_examples_hold_through_the_stable_softmax() -> None:
    # docs/algorithm.md section 6, PSA with TF-IDF: tau 0.1 and 0.01
    batch = _e7_batch()
    np.testing.assert_allclose(
        _psa(batch, 0.1)[0], [4.748818, 0.017333, -4.751182, -0.012622], atol=1e-6
    )
    np.testing.assert_allclose(_psa(batch, 0.01)[0], [4.75, 0.0, -4.75, 0.0], atol=1e-6)


# --- blocks of rows -----------------------------------------------------------------------------


def _random_group_batch(
    n_rows: int, n_groups: int, seed: int, dim: int = 6
) -> tuple[StepBatch, np.ndarray]:
    """One-step trajectories with distinct texts, and a random unit vector per text."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(n_groups, size=n_rows)
    batch = StepBatch.from_trajectories(
        [traj(f"t{i}", f"g{groups[i]}", [f"s{i}"], [float(rng.normal())]) for i in range(n_rows)]
    )
    vectors = rng.normal(size=(len(batch.states), dim))
    return batch, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("block_entries", [1, 7, 64, 1 << 20])
def test_row_blocks_change_nothing(block_entries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    batch, vectors = _random_group_batch(300, 3, seed=block_entries)
    monkeypatch.setattr(step_module, "KERNEL_BLOCK_ENTRIES", block_entries)
    features = dense_features(vectors, batch.row_state)
    returns = np.asarray(batch.rewards)
    for tau in (0.05, 1.0):
        advantages, effective = soft_aggregation(returns, batch, features, tau, Scope.GROUP)
        reference = _direct(returns, vectors[batch.row_state], batch.row_group, tau)
        np.testing.assert_allclose(advantages, reference[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(effective, reference[1], rtol=1e-12)


def test_sparse_features_with_duplicate_entries() -> None:
    # a non-canonical CSR (an entry stored twice) means the sum, as scipy defines it
    batch, vectors = _random_group_batch(40, 2, seed=3, dim=4)
    dense = vectors.copy()
    coo = sp.coo_matrix(dense)
    halves = sp.csr_matrix(
        (
            np.concatenate([coo.data / 2, coo.data / 2]),
            (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col])),
        ),
        shape=dense.shape,
    )
    halves.has_canonical_format = False
    returns = np.asarray(batch.rewards)
    ours = soft_aggregation(
        returns, batch, StateFeatures(halves, batch.row_state), 0.1, Scope.GROUP
    )
    reference = soft_aggregation(
        returns, batch, dense_features(dense, batch.row_state), 0.1, Scope.GROUP
    )
    np.testing.assert_allclose(ours[0], reference[0], atol=1e-12)
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-12)


def test_a_large_group_never_holds_m_by_m() -> None:
    # one group of 6,000 distinct states: m x m float64 would be 275 MiB
    m = 6_000
    batch, vectors = _random_group_batch(m, 1, seed=1, dim=8)
    features = dense_features(vectors, batch.row_state)
    returns = np.asarray(batch.rewards)
    tracemalloc.start()
    try:
        advantages, effective = soft_aggregation(returns, batch, features, 0.1, Scope.GROUP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert peak < m * m * 8 / 4
    sample = np.random.default_rng(0).choice(m, size=25, replace=False)
    logits = vectors[batch.row_state[sample]] @ vectors[batch.row_state].T / 0.1
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(advantages[sample], returns[sample] - weights @ returns, atol=1e-12)
    np.testing.assert_allclose(effective[sample], 1.0 / np.sum(weights**2, axis=1), rtol=1e-10)


def test_tiny_tau_matches_exact_anchors_on_a_real_batch() -> None:
    # ALFWorld-like texts: at tau 1e-300 PSA over TF-IDF is exact grouping by TF-IDF vector
    trajs = [
        traj(
            f"t{k}",
            f"g{k % 3}",
            [E7_STATES[(k + t) % 4] + (" again" if (k * t) % 5 == 0 else "") for t in range(6)],
            [float((k + t) % 3) for t in range(6)],
        )
        for k in range(12)
    ]
    batch = StepBatch.from_trajectories(trajs)
    features = tfidf_features(batch)
    assert features is not None
    # anchors by identical TF-IDF vector within a group
    vectors = features.matrix.toarray()
    _, vector_id = np.unique(vectors, axis=0, return_inverse=True)
    anchors = np.unique(
        batch.row_group * (vector_id.max() + 1) + vector_id.reshape(-1)[features.row_index],
        return_inverse=True,
    )[1].reshape(-1)
    returns = np.asarray(batch.rewards)
    expected, sizes = exact_anchor_advantages(returns, anchors, Normalization.MEAN)
    advantages, effective = soft_aggregation(returns, batch, features, 1e-300, Scope.GROUP)
    # exact anchors give a singleton 0, PSA gives G - G = 0 too
    np.testing.assert_allclose(advantages, expected, atol=1e-12)
    np.testing.assert_array_equal(effective, sizes)


@pytest.mark.parametrize("sparse_entry_cost", [0, 10**9], ids=["csr-rows", "dense-blas"])
def test_both_gram_paths_agree_with_the_definition(
    sparse_entry_cost: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # long varied texts (sparse TF-IDF rows) through either product, row blocks included
    monkeypatch.setattr(step_module, "SPARSE_ENTRY_COST", sparse_entry_cost)
    monkeypatch.setattr(step_module, "KERNEL_BLOCK_ENTRIES", 5_000)
    rng = np.random.default_rng(5)
    words = [f"word{i}" for i in range(400)]
    trajs = [
        traj(
            f"t{k}",
            f"g{k % 2}",
            [" ".join(rng.choice(words, size=12)) for _ in range(40)],
            [float(rng.normal()) for _ in range(40)],
        )
        for k in range(6)
    ]
    batch = StepBatch.from_trajectories(trajs)
    features = tfidf_features(batch)
    assert features is not None
    returns = np.asarray(batch.rewards)
    vectors = features.matrix.toarray()[features.row_index]
    advantages, effective = soft_aggregation(returns, batch, features, 0.05, Scope.GROUP)
    reference = _direct(returns, vectors, batch.row_group, 0.05)
    np.testing.assert_allclose(advantages, reference[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(effective, reference[1], rtol=1e-12)
