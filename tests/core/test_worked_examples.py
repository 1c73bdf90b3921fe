"""Every worked example of ALGORITHM.md section 6 and proxmo-paper.md section 9 (E1-E10)."""

from __future__ import annotations

import numpy as np
import pytest
from proxmo.core import (
    PRESETS,
    Scope,
    Similarity,
    StepBatch,
    apply_update,
    beta_from_range,
    compute_advantages,
    decay,
    dense_features,
    discounted_returns,
    group_success_rates,
    psc_weights,
    required_features,
    resolve_config,
    success_rate,
    task_batch_counts,
    tfidf_features,
    uses_history,
)
from sklearn.feature_extraction.text import TfidfVectorizer

from .helpers import run, traj

BETA = 0.216395  # ALGORITHM.md's rounded default; the exact default is beta_from_range(0.05)


# --- E1: PSC weights ---------------------------------------------------------------------------

E1_TABLE = [  # p, (w+, w-) for beta 0.216395, 0.1, 0.866
    (0.0, (1.050000, 1.000000), (1.023106, 1.000000), (1.200097, 1.000000)),
    (0.125, (1.030834, 0.999987), (1.014249, 0.999994), (1.123395, 0.999947)),
    (0.25, (1.016976, 0.999789), (1.007845, 0.999902), (1.067936, 0.999154)),
    (0.375, (1.008239, 0.998930), (1.003807, 0.999506), (1.032971, 0.995719)),
    (0.5, (1.003380, 0.996620), (1.001562, 0.998438), (1.013527, 0.986473)),
    (0.625, (1.001070, 0.991761), (1.000494, 0.996193), (1.004281, 0.967029)),
    (0.75, (1.000211, 0.983024), (1.000098, 0.992155), (1.000846, 0.932064)),
    (0.875, (1.000013, 0.969166), (1.000006, 0.985751), (1.000053, 0.876605)),
    (1.0, (1.000000, 0.950000), (1.000000, 0.976894), (1.000000, 0.799903)),
]


@pytest.mark.parametrize(("p", "w_default", "w_01", "w_0866"), E1_TABLE)
def test_e1_psc_weight_table(
    p: float,
    w_default: tuple[float, float],
    w_01: tuple[float, float],
    w_0866: tuple[float, float],
) -> None:
    for beta, expected in ((BETA, w_default), (0.1, w_01), (0.866, w_0866)):
        w_plus, w_minus = psc_weights(np.array([p]), 4.0, beta)
        assert w_plus[0] == pytest.approx(expected[0], abs=1e-6)
        assert w_minus[0] == pytest.approx(expected[1], abs=1e-6)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (1, [(1.03877, 0.98655), (1.02650, 0.97350), (1.01345, 0.96123)]),
        (2, [(1.02965, 0.99662), (1.01345, 0.98655), (1.00338, 0.97035)]),
        (4, [(1.01698, 0.99979), (1.00338, 0.99662), (1.00021, 0.98302)]),
        (5, [(1.01278, 0.99995), (1.00169, 0.99831), (1.00005, 0.98722)]),
        (8, [(1.00541, 1.00000), (1.00021, 0.99979), (1.00000, 0.99459)]),
    ],
)
def test_e1_alpha_sweep(alpha: float, expected: list[tuple[float, float]]) -> None:
    w_plus, w_minus = psc_weights(np.array([0.25, 0.5, 0.75]), alpha, BETA)
    np.testing.assert_allclose(w_plus, [e[0] for e in expected], atol=5e-6)
    np.testing.assert_allclose(w_minus, [e[1] for e in expected], atol=5e-6)


def test_default_beta_is_range_005() -> None:
    cfg = resolve_config("paper")
    assert cfg.psc_beta == pytest.approx(BETA, abs=1e-6)
    assert cfg.psc_beta == beta_from_range(0.05)
    assert resolve_config("paper", {"psc_range": 0.2}).psc_beta == pytest.approx(0.865581, abs=1e-6)


# --- E2-E4: modulated z-scores -------------------------------------------------------------------


def _episode_by_outcome(successes: int, preset_overrides: dict[str, object]) -> tuple[float, float]:
    """One group of 8 one-step trajectories (R = 1 for the first `successes`)."""
    trajs = [traj(f"t{i}", "g", ["s"], [1.0 if i < successes else 0.0]) for i in range(8)]
    cfg = resolve_config("paper", {"similarity": "EXACT", **preset_overrides})
    _, result = run(trajs, cfg)
    episode = result.episode_advantages
    return float(episode[0]), float(episode[-1])


@pytest.mark.parametrize(
    ("successes", "overrides", "expected"),
    [
        (2, {}, (1.647686, -0.539946)),  # E2 z-score
        (2, {"episode_normalization": "MEAN"}, (0.762732, -0.249947)),  # E2 mean-only
        (2, {"psc_beta": 0.1}, (1.632892, -0.540008)),  # E2 beta 0.1
        (6, {}, (0.540175, -1.592678)),  # E3
        (1, {}, (2.551176, -0.353548)),  # E4 p = 0.125
        (7, {}, (0.353557, -2.398557)),  # E4 p = 0.875
        (0, {}, (0.0, 0.0)),  # all fail
        (8, {}, (0.0, 0.0)),  # all succeed
    ],
)
def test_e2_e4_modulated_episode(
    successes: int, overrides: dict[str, object], expected: tuple[float, float]
) -> None:
    success_value, failure_value = _episode_by_outcome(successes, overrides)
    if successes < 8:
        assert failure_value == pytest.approx(expected[1], abs=1e-6)
    if successes > 0:
        assert success_value == pytest.approx(expected[0], abs=1e-6)


def test_e2_raw_z_scores_without_psc() -> None:
    success_value, failure_value = _episode_by_outcome(2, {"psc_enabled": False})
    assert (success_value, failure_value) == pytest.approx((1.620182, -0.540061), abs=1e-6)


# --- E5: returns -----------------------------------------------------------------------------


def test_e5_discounted_returns_and_invalid_penalty() -> None:
    batch = StepBatch.from_trajectories(
        [
            traj("a", "g", ["s"] * 4, [0, 0, 0, 10]),
            traj("b", "g", ["s"] * 4, [0, 0, 0, 10], invalid=[False, True, False, False]),
        ]
    )
    returns = discounted_returns(batch, 0.95, 0.1)
    np.testing.assert_allclose(returns[:4], [8.57375, 9.025, 9.5, 10], atol=1e-12)
    np.testing.assert_allclose(returns[4:], [8.57375, 8.925, 9.5, 10], atol=1e-12)


def test_returns_gamma_zero_and_one() -> None:
    batch = StepBatch.from_trajectories([traj("a", "g", ["s"] * 3, [1, 2, 3])])
    np.testing.assert_allclose(discounted_returns(batch, 0.0, 0.1), [1, 2, 3])
    np.testing.assert_allclose(discounted_returns(batch, 1.0, 0.1), [6, 5, 3])


# --- E6: PSA by hand -------------------------------------------------------------------------


def test_e6_psa_by_hand() -> None:
    # x0 . x1 = 0.9, x0 . x2 = 0.2 (unit vectors)
    vectors = np.array(
        [[1.0, 0.0, 0.0], [0.9, np.sqrt(1 - 0.81), 0.0], [0.2, 0.0, np.sqrt(1 - 0.04)]]
    )
    trajs = [traj(f"t{i}", "g", [f"s{i}"], [r]) for i, r in enumerate([1.0, 0.0, 0.0])]
    batch = StepBatch.from_trajectories(trajs)
    cfg = resolve_config("paper", {"similarity": "ENCODER", "tau": 0.1, "gamma": 0.95})
    features = dense_features(vectors, batch.row_state)
    result = compute_advantages(batch, cfg, features=features)
    assert result.step_advantages[0] == pytest.approx(0.269121, abs=1e-6)
    weights = np.array([0.730879, 0.268875, 0.000245])
    # row 0's effective neighbours 1 / sum_j W_0j^2 from the published weights
    x0 = features.matrix[0]
    logits = features.matrix @ x0 / 0.1
    w = np.exp(logits - logits.max())
    w /= w.sum()
    np.testing.assert_allclose(w, weights, atol=1e-6)


# --- E7: PSA with TF-IDF -----------------------------------------------------------------------

E7_STATES = [
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1.",
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2.",
]
E7_RETURNS = [9.5, 10.0, 0.0, 0.0]


def _e7(tau: float, extra: list[tuple[str, str, float]] | None = None) -> np.ndarray:
    trajs = [
        traj(f"r{i}", "g", [s], [g])
        for i, (s, g) in enumerate(zip(E7_STATES, E7_RETURNS, strict=True))
    ]
    for name, group, g in extra or []:
        trajs.append(traj(name, group, [E7_STATES[0]], [g]))
    _, result = run(trajs, resolve_config("paper", {"tau": tau}))
    return result.step_advantages


def test_e7_psa_tfidf() -> None:
    np.testing.assert_allclose(_e7(0.1), [4.748818, 0.017333, -4.751182, -0.012622], atol=1e-6)


def test_e7_cosines_and_baselines() -> None:
    batch = StepBatch.from_trajectories(
        [
            traj(f"r{i}", "g", [s], [g])
            for i, (s, g) in enumerate(zip(E7_STATES, E7_RETURNS, strict=True))
        ]
    )
    features = tfidf_features(batch)
    assert features is not None
    x = features.matrix[features.row_index].toarray()
    sims = x @ x.T
    assert sims[0, 1] == pytest.approx(0.313764, abs=1e-6)
    assert sims[0, 3] == pytest.approx(0.267412, abs=1e-6)
    assert sims[1, 3] == pytest.approx(0.264485, abs=1e-6)
    baselines = np.array(E7_RETURNS) - _e7(0.1)
    np.testing.assert_allclose(baselines, [4.751182, 9.982667, 4.751182, 0.012622], atol=1e-6)


def test_e7_tau_sweep() -> None:
    np.testing.assert_allclose(_e7(0.01), [4.75, 0.0, -4.75, 0.0], atol=1e-6)
    np.testing.assert_allclose(_e7(1.0), [4.629344, 4.053986, -4.870656, -3.834690], atol=1e-6)
    # tau = 100: baseline "about 4.875" (the group mean); tau -> inf reaches it
    np.testing.assert_allclose(np.array(E7_RETURNS) - _e7(100.0), 4.875, atol=1e-2)
    np.testing.assert_allclose(np.array(E7_RETURNS) - _e7(1e7), 4.875, atol=1e-6)


def test_e7_fifth_row_in_another_group() -> None:
    advantages = _e7(0.1, extra=[("r4", "other", 10.0)])
    assert advantages[4] == 0.0
    np.testing.assert_allclose(advantages[:4], [4.74905, 0.014578, -4.75095, -0.010791], atol=1e-6)


# --- E8: TF-IDF quirks ------------------------------------------------------------------------


def test_e8_tfidf_quirks() -> None:
    base = "You arrive at cabinet 1. The cabinet 1 is closed."
    docs = [
        base,
        base.replace("1", "2"),
        base.replace("1", "12"),
        "The cabinet 1 is closed. You arrive at cabinet 1.",
    ]
    batch = StepBatch.from_trajectories(
        [traj(f"d{i}", "g", [d], [0.0]) for i, d in enumerate(docs)]
    )
    features = tfidf_features(batch)
    assert features is not None
    x = features.matrix[features.row_index].toarray()
    sims = x @ x.T
    assert sims[0, 1] == pytest.approx(1.0, abs=1e-7)  # single-character tokens are dropped
    assert sims[0, 2] == pytest.approx(0.6364, abs=5e-5)
    assert sims[0, 3] == pytest.approx(1.0, abs=1e-7)  # word order is ignored
    reference = TfidfVectorizer(max_features=1024).fit_transform(docs).toarray()
    assert (reference @ reference.T)[0, 2] == pytest.approx(sims[0, 2], abs=1e-7)


# --- E9: full pipeline ------------------------------------------------------------------------

E9_I = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, "
    "a countertop 1, a fridge 1."
)
E9_FR = "You arrive at fridge 1. The fridge 1 is closed."
E9_FO = "You open the fridge 1. The fridge 1 is open. In it, you see a apple 1."
E9_CT = "You arrive at countertop 1. On the countertop 1, you see a knife 1."
E9_CB = "You arrive at cabinet 1. The cabinet 1 is closed."


def _e9(win: float) -> list:  # type: ignore[type-arg]
    return [
        traj("T1", "g", [E9_I, E9_FR, E9_FO], [0, 0, win]),
        traj("T2", "g", [E9_I, E9_CT, E9_CB], [0, 0, 0]),
        traj("T3", "g", [E9_I, E9_FR], [0, win]),
        traj("T4", "g", [E9_I, E9_FR, E9_CT], [0, 0, 0]),
    ]


def test_e9a_paper_flavour() -> None:
    _, result = run(_e9(1.0), resolve_config("paper"))
    np.testing.assert_allclose(
        result.returns, [0.9025, 0.95, 1, 0, 0, 0, 0.95, 1, 0, 0, 0], atol=1e-12
    )
    np.testing.assert_allclose(
        result.step_advantages,
        [
            0.43965,
            0.30409,
            0.00422,
            -0.46285,
            -0.00248,
            -0.0339,
            0.48715,
            0.35409,
            -0.46285,
            -0.64591,
            -0.00248,
        ],
        atol=1e-5,
    )
    episode = result.episode_advantages
    np.testing.assert_allclose(episode[[0, 6]], 0.86895, atol=1e-5)
    np.testing.assert_allclose(episode[[3, 8]], -0.86310, atol=1e-5)
    np.testing.assert_allclose(
        result.advantages,
        [
            1.30860,
            1.17305,
            0.87317,
            -1.32595,
            -0.86557,
            -0.89699,
            1.35610,
            1.22305,
            -1.32595,
            -1.50900,
            -0.86557,
        ],
        atol=1e-5,
    )
    groups = result.groups
    assert groups.success_rate[0] == 0.5
    assert groups.weight_success[0] == pytest.approx(1.003380, abs=1e-6)
    assert groups.weight_failure[0] == pytest.approx(0.996620, abs=1e-6)
    assert groups.num_trajectories[0] == 4 and groups.num_steps[0] == 11
    assert groups.num_successes[0] == 2


def test_e9a_mean_only() -> None:
    _, result = run(_e9(1.0), resolve_config("paper", {"episode_normalization": "MEAN"}))
    np.testing.assert_allclose(result.episode_advantages[[0, 3]], [0.50169, -0.49831], atol=1e-5)
    np.testing.assert_allclose(
        result.advantages,
        [
            0.94134,
            0.80578,
            0.50591,
            -0.96116,
            -0.50079,
            -0.53221,
            0.98884,
            0.85578,
            -0.96116,
            -1.14422,
            -0.50079,
        ],
        atol=1e-5,
    )


def test_e9b_released_code_flavour() -> None:
    _, paper = run(_e9(1.0), resolve_config("paper"))
    _, result = run(_e9(10.0), resolve_config("proxmo-rl"))
    groups = result.groups
    assert groups.success_rate[0] == 1.0  # clip(row mean 4.54545) saturates
    assert groups.weight_success[0] == 1.0
    assert groups.weight_failure[0] == pytest.approx(0.95, abs=1e-7)
    np.testing.assert_allclose(result.episode_advantages[[0, 3]], [5.45455, -4.31818], atol=1e-5)
    np.testing.assert_allclose(result.step_advantages, 10 * paper.step_advantages, atol=1e-9)
    np.testing.assert_allclose(
        result.advantages,
        [
            9.85104,
            8.49549,
            5.49678,
            -8.94669,
            -4.34295,
            -4.65716,
            10.32604,
            8.99549,
            -8.94669,
            -10.77723,
            -4.34295,
        ],
        atol=1e-5,
    )


# --- E10: released-code p saturation ---------------------------------------------------------


def _e10() -> list:  # type: ignore[type-arg]
    return [
        traj("A", "g", ["a", "b"], [0, 10]),
        traj("B", "g", ["a", "b", "c"], [0, 0, 0]),
        traj("C", "g", ["a", "b", "c"], [0, 0, 0]),
        traj("D", "g", ["a", "b"], [0, 10]),
    ]


def test_e10_row_mean_saturation() -> None:
    cfg = resolve_config("proxmo-rl", {"similarity": "EXACT"})
    _, result = run(_e10(), cfg)
    assert result.groups.success_rate[0] == 1.0
    np.testing.assert_allclose(
        result.episode_advantages, [6, 6, -3.8, -3.8, -3.8, -3.8, -3.8, -3.8, 6, 6], atol=1e-9
    )
    cfg_std = resolve_config(
        "proxmo-rl", {"similarity": "EXACT", "episode_normalization": "MEAN_STD"}
    )
    _, z = run(_e10(), cfg_std)
    np.testing.assert_allclose(z.episode_advantages[[0, 2]], [1.161895, -0.735867], atol=1e-6)
    # the trajectory-level view: p = 0.5, z = +-0.866 becomes +0.868953 / -0.863098
    _, paper = run(_e10(), resolve_config("paper", {"similarity": "EXACT"}))
    assert paper.groups.success_rate[0] == 0.5
    np.testing.assert_allclose(paper.episode_advantages[[0, 2]], [0.868953, -0.863098], atol=1e-6)


def test_row_mean_single_row_group_uses_mu_zero() -> None:
    """ALGORITHM.md section 2: ROW_MEAN's mu_g is 0 for a group of a single value, as in the
    released code. A lone successful row (score 1) thus gets w+ for p = 0 (1.05 at the
    defaults), not w+ for its raw mean p = 1 (1.0); its STEP-unit MEAN value is the raw score."""
    cfg = resolve_config("proxmo-rl", {"similarity": "EXACT"})
    trajs = [
        traj("lone", "g1", ["s"], [1.0]),
        traj("a", "g2", ["s", "t"], [0.0, 1.0]),  # one trajectory of two rows: mu = R = 1
        traj("b", "g3", ["s"], [0.4]),
        traj("c", "g3", ["s"], [1.0]),  # two single-row trajectories: mu = 0.7
    ]
    _, result = run(trajs, cfg)
    np.testing.assert_array_equal(result.groups.success_rate, [0.0, 1.0, 0.7])
    w_plus, _ = psc_weights(np.array([0.0]), cfg.psc_alpha, cfg.psc_beta)
    assert w_plus[0] == pytest.approx(1.05, abs=1e-12)
    assert result.episode_advantages[0] == pytest.approx(1.0 * w_plus[0], abs=1e-12)
    assert result.groups.weight_success[0] == pytest.approx(1.05, abs=1e-12)
    # the two-row group: p = 1, w+ = 1, and x - mu = 0 for both rows
    np.testing.assert_allclose(result.episode_advantages[1:3], [0.0, 0.0], atol=1e-12)


# --- Exact grouping, GiGPO, diagnostics ------------------------------------------------------


def test_exact_similarity_is_tau_zero_limit_of_e7() -> None:
    trajs = [
        traj(f"r{i}", "g", [s], [g])
        for i, (s, g) in enumerate(zip(E7_STATES, E7_RETURNS, strict=True))
    ]
    _, result = run(trajs, resolve_config("paper", {"similarity": "EXACT"}))
    np.testing.assert_allclose(result.step_advantages, [4.75, 0.0, -4.75, 0.0], atol=1e-12)
    assert result.groups.singleton_fraction[0] == 0.5
    assert result.groups.mean_effective_neighbors[0] == 1.5  # anchor sizes 2, 1, 2, 1


def test_gigpo_mean_std_anchors_and_state_keys() -> None:
    trajs = [
        traj("a", "g", ["x", "y"], [0, 3], state_keys=["k1", ""]),
        traj("b", "g", ["z", "y"], [0, 1], state_keys=["k1", ""]),
        traj("c", "g", ["x", "w"], [0, 0], state_keys=["k2", ""]),
    ]
    cfg = resolve_config("gigpo", {"step_normalization": "MEAN_STD", "gamma": 1.0})
    _, result = run(trajs, cfg)
    # anchors: k1 = {a0 (G 3), b0 (G 1)}, "y" = {a1 (3), b1 (1)}, k2 and "w" singletons
    std = np.std([3.0, 1.0], ddof=1)
    expected = [1 / (std + 1e-6), 1 / (std + 1e-6), -1 / (std + 1e-6), -1 / (std + 1e-6), 0, 0]
    np.testing.assert_allclose(result.step_advantages, expected, atol=1e-12)
    assert result.groups.singleton_fraction[0] == pytest.approx(2 / 6)


def test_same_step_scope_restricts_candidates() -> None:
    # same state at t=0 and t=1: SAME_STEP keeps them apart, GROUP merges them
    trajs = [
        traj("a", "g", ["s", "s"], [0, 1]),
        traj("b", "g", ["s", "u"], [0, 0]),
    ]
    group = resolve_config("paper", {"similarity": "EXACT", "gamma": 1.0})
    same = resolve_config("paper", {"similarity": "EXACT", "gamma": 1.0, "scope": Scope.SAME_STEP})
    _, r_group = run(trajs, group)
    _, r_same = run(trajs, same)
    # G = [1, 1, 0, 0]; GROUP anchor "s" = rows 0, 1, 2 (mean 2/3); SAME_STEP: t=0 rows 0, 2
    np.testing.assert_allclose(r_group.step_advantages, [1 / 3, 1 / 3, -2 / 3, 0], atol=1e-12)
    np.testing.assert_allclose(r_same.step_advantages, [0.5, 0.0, -0.5, 0.0], atol=1e-12)


def test_grpo_and_rloo() -> None:
    trajs = [traj(f"t{i}", "g", ["s", "s"], [0, r]) for i, r in enumerate([1.0, 0.0, 0.0, 3.0])]
    trajs.append(traj("lone", "h", ["s"], [2.0]))
    _, grpo = run(trajs, resolve_config("grpo"))
    r = np.array([1.0, 0.0, 0.0, 3.0])
    z = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(grpo.advantages[:8], np.repeat(z, 2), atol=1e-12)
    # a lone trajectory: mu = 0, sigma = 1, so (x - 0) / (1 + 1e-6), as verl computes it
    assert grpo.advantages[8] == pytest.approx(2.0 / (1.0 + 1e-6), abs=1e-15)
    assert not grpo.step_advantages.any()
    assert grpo.groups.mean_effective_neighbors.tolist() == [0.0, 0.0]
    _, rloo = run(trajs, resolve_config("rloo"))
    loo = np.array([ri - np.delete(r, i).mean() for i, ri in enumerate(r)])
    np.testing.assert_allclose(rloo.advantages[:8], np.repeat(loo, 2), atol=1e-12)
    assert rloo.advantages[8] == 2.0
    np.testing.assert_allclose(rloo.returns[:2], [0.95, 1.0])


def test_empty_tfidf_vocabulary_gives_zero_step_term() -> None:
    trajs = [traj("a", "g", ["1 2", "a"], [0, 1]), traj("b", "g", ["1", "!"], [0, 0])]
    batch = StepBatch.from_trajectories(trajs)
    assert tfidf_features(batch) is None
    _, result = run(trajs, resolve_config("paper"))
    assert not result.step_advantages.any()
    assert result.groups.mean_effective_neighbors[0] == 0.0


def test_history_math() -> None:
    assert decay(1.0) == 0.5
    assert decay(8.0) == pytest.approx(0.5 ** (1 / 8))
    # a task's first batch: S = N = 0, so the prior shrinks it too (ALGORITHM.md section 2)
    assert apply_update(None, 3, 8, rho=decay(8.0), prior=1.0) == (3.0, 8.0, 4 / 10)
    assert apply_update(None, 3, 8, rho=decay(8.0), prior=0.0) == (3.0, 8.0, 3 / 8)
    assert apply_update(None, 0, 1, rho=decay(8.0), prior=2.0)[2] == 2 / 5
    s, n, p = apply_update((4.0, 8.0), 1, 8, rho=decay(1.0), prior=0.0)
    assert (s, n, p) == (3.0, 12.0, 0.25)
    assert apply_update((4.0, 8.0), 1, 8, rho=0.5, prior=1.0)[2] == pytest.approx(4 / 14)
    assert success_rate(3.0, 12.0, 1.0) == pytest.approx(4 / 14)
    assert np.isnan(success_rate(0.0, 0.0, 0.0))


def test_history_rates_drive_psc() -> None:
    trajs = [traj(f"t{i}", "g", ["s"], [1.0 if i < 2 else 0.0]) for i in range(8)]
    cfg = resolve_config("proxmo", {"similarity": "EXACT"})
    _, with_history = run(trajs, cfg, group_success_rate=np.array([0.75]))
    assert with_history.groups.success_rate[0] == 0.75
    assert with_history.groups.success_rate_source[0].value == "HISTORY"
    z = 1.620182
    w_plus, _ = psc_weights(np.array([0.75]), 4.0, cfg.psc_beta)
    assert with_history.episode_advantages[0] == pytest.approx(z * w_plus[0], abs=1e-6)
    _, fallback = run(trajs, cfg)
    assert fallback.groups.success_rate[0] == 0.25
    assert fallback.groups.success_rate_source[0].value == "BATCH"


def test_encoder_default_tau() -> None:
    cfg = resolve_config("proxmo", default_similarity=Similarity.ENCODER)
    assert cfg.tau == 0.05 and cfg.similarity is Similarity.ENCODER
    assert resolve_config("proxmo").tau == 0.1
    assert resolve_config("paper", {"similarity": "ENCODER"}).tau == 0.1  # the preset sets it
    assert resolve_config("gigpo", {"tau": 0.3}).tau == 0.3


def test_task_batch_counts_and_group_rates() -> None:
    trajs = [
        traj("a", "g1", ["s"], [1.0], task_id="task"),
        traj("b", "g1", ["s"], [0.0], task_id="task"),
        traj("c", "g2", ["s"], [0.0], task_id="other"),
        traj("d", "g3", ["s"], [0.0], task_id="task", success=True),
    ]
    batch = StepBatch.from_trajectories(trajs)
    cfg = resolve_config("proxmo")
    task_ids, successes, trials = task_batch_counts(batch, cfg)
    assert task_ids == ["task", "other"]
    assert successes.tolist() == [2, 0] and trials.tolist() == [3, 1]
    rates = group_success_rates(batch, {"task": 0.25, "other": 0.5})
    assert rates.tolist() == [0.25, 0.5, 0.25]


def test_uses_history_and_required_features() -> None:
    assert uses_history(resolve_config("proxmo"))
    assert not uses_history(resolve_config("paper"))
    assert not uses_history(
        resolve_config("grpo", {"psc_enabled": True, "success_rate_source": "HISTORY"})
    )
    assert uses_history(
        resolve_config("gigpo", {"psc_enabled": True, "success_rate_source": "HISTORY"})
    )
    assert required_features(resolve_config("paper")) is Similarity.TFIDF
    encoder = resolve_config("proxmo", default_similarity=Similarity.ENCODER)
    assert required_features(encoder) is Similarity.ENCODER
    assert required_features(resolve_config("gigpo", {"similarity": "TFIDF"})) is None
    assert required_features(resolve_config("paper", {"similarity": "EXACT"})) is None


def test_every_preset_resolves_every_field() -> None:
    for name, spec in PRESETS.items():
        assert spec.description
        cfg = resolve_config(name)
        assert cfg.preset == name
        assert all(getattr(cfg, f) is not None for f in cfg.__dataclass_fields__)
    assert resolve_config("").preset == "proxmo"
    # explicit fields override the preset
    assert resolve_config("gigpo", {"gamma": 0.5, "stats_unit": "TRAJECTORY"}).gamma == 0.5
