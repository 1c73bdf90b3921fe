"""HGPO and GraphGPO (docs/algorithm.md section 4a): worked examples by hand, limits and config.

The batch of the worked examples, one group, gamma 0.95 (HGPO) / 0.1 (GraphGPO), lambda 0.1:

    a: s0 -> s1 -> s2, rewards 0, 0, 1 (success)
    b: s0 -> s1 -> s3, rewards 0, 0, 0 (failure)
    c: s0 -> s4 -> s2, rewards 0, 0, 1 (success), step 1 invalid

The side-by-side comparison with verl-agent's own functions (commit 20bd331) runs outside the
repository; its numbers are in docs/core.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from proxmo.core import (
    Estimator,
    StepBatch,
    TrajectoryInput,
    ValidationError,
    compute_advantages,
    resolve_config,
)

from .helpers import traj

EPS = 1e-6


def _example() -> list[TrajectoryInput]:
    return [
        traj("a", "g", ["s0", "s1", "s2"], [0, 0, 1]),
        traj("b", "g", ["s0", "s1", "s3"], [0, 0, 0]),
        traj("c", "g", ["s0", "s4", "s2"], [0, 0, 1], invalid=[False, True, False]),
    ]


def _random_batch(
    rng: np.random.Generator, *, n_traj: int, n_groups: int, n_states: int, terminal: bool
) -> list[TrajectoryInput]:
    """Trajectories of 1-6 steps over a few states; `terminal`: a 0/1 reward at the end and
    random invalid steps, else normal rewards at every step."""
    trajs = []
    for i in range(n_traj):
        n = int(rng.integers(1, 7))
        states = [f"s{int(v)}" for v in rng.integers(0, n_states, size=n)]
        if terminal:
            rewards = [0.0] * (n - 1) + [float(rng.choice([0.0, 1.0]))]
            invalid = (rng.random(n) < 0.3).tolist()
        else:
            rewards, invalid = rng.normal(size=n).tolist(), [False] * n
        trajs.append(traj(f"t{i}", f"g{i % n_groups}", states, rewards, invalid=invalid))
    return trajs


def _run(trajs: list[TrajectoryInput], preset: str, **overrides: Any) -> Any:
    return compute_advantages(StepBatch.from_trajectories(trajs), resolve_config(preset, overrides))


# --- HGPO ----------------------------------------------------------------------------------------


def test_hgpo_worked_example() -> None:
    """Returns a: [0.9025, 0.95, 1], b: [0, 0, 0], c: [0.9025, 0.85, 1].

    Key (s0) = rows a0, b0, c0 with G = [x, 0, x], x = 0.9025: mean 2x/3, population std
    x*sqrt(2)/3, so z = +(x/3) / (x*sqrt(2)/3 + 1e-6) for a0 and c0, -(2x/3) / (...) for b0; the
    rows at t = 0 have only k = 1: A = 2 z / (2 + 1e-6).
    Keys (s1) and (s0, s1) = rows a1, b1 with G = [0.95, 0]: z = +-0.475 / (0.475 + 1e-6) in
    both, weights 2 and 3: A = +-5 z / (5 + 1e-6).
    Key (s2) = rows a2, c2 with G = [1, 1]: value 0, dropped; every other key is a singleton:
    A = 0 for a2, c2, b2 (s3) and c1 (s4).
    """
    result = _run(_example(), "hgpo")
    x = 0.9025
    spread = x * math.sqrt(2.0) / 3.0 + EPS
    z_plus, z_minus = (x / 3.0) / spread, (-2.0 * x / 3.0) / spread
    z1 = 0.475 / (0.475 + EPS)
    expected = [
        2 * z_plus / (2 + EPS), 5 * z1 / (5 + EPS), 0.0,
        2 * z_minus / (2 + EPS), -5 * z1 / (5 + EPS), 0.0,
        2 * z_plus / (2 + EPS), 0.0, 0.0,
    ]  # fmt: skip
    np.testing.assert_allclose(result.advantages, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.step_advantages, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.episode_advantages, 0.0)
    np.testing.assert_allclose(
        result.returns, [0.9025, 0.95, 1, 0, 0, 0, 0.9025, 0.85, 1], rtol=0, atol=1e-12
    )
    # a1 and b1 drew on the key (s0, s1) of length 2: 2 of 9 rows
    np.testing.assert_allclose(result.groups.hgpo_long_history_fraction, [2 / 9], atol=1e-15)
    # k = 1 anchor sizes: s0 x3, s1 x2, s2 x2, s3, s4 -> (3*3 + 2*2 + 2*2 + 1 + 1) / 9
    np.testing.assert_allclose(result.groups.mean_effective_neighbors, [19 / 9], atol=1e-12)


def test_hgpo_mean_mode_and_alpha() -> None:
    """MEAN keeps G - mean: a1 has 0.475 in (s1) and in (s0, s1); with alpha 2 the weights
    are 2^2 and 3^2, and the mean of two equal values is that value (up to the 1e-6)."""
    result = _run(_example(), "hgpo", step_normalization="MEAN", hgpo_alpha=2.0)
    assert result.advantages[1] == pytest.approx(13 * 0.475 / (13 + EPS), abs=1e-12)
    x = 0.9025
    assert result.advantages[0] == pytest.approx(4 * (x / 3) / (4 + EPS), abs=1e-12)


def test_hgpo_history_length_zero_keeps_only_anchors() -> None:
    """K = 0 (a set 0 is 0, not the preset's 2): only k = 1, so a1 = 2 z / (2 + 1e-6)."""
    result = _run(_example(), "hgpo", hgpo_history_length=0)
    z1 = 0.475 / (0.475 + EPS)
    assert result.advantages[1] == pytest.approx(2 * z1 / (2 + EPS), abs=1e-12)
    np.testing.assert_array_equal(result.groups.hgpo_long_history_fraction, [0.0])


def test_hgpo_base_group_joins_with_weight_one() -> None:
    """Base item: GiGPO's per-row episode z-score of the row scores R - lambda*v =
    [1, 1, 1, 0, 0, 0, 1, 0.9, 1] (unbiased std). Row a2 had no item: now A = z / (1 + 1e-6);
    row a1 had 5 z1 / (5 + 1e-6): now (z + 5 z1) / (6 + 1e-6)."""
    scores = np.array([1, 1, 1, 0, 0, 0, 1, 0.9, 1.0])
    base = (scores - scores.mean()) / (scores.std(ddof=1) + EPS)
    result = _run(_example(), "hgpo", hgpo_base_group=True)
    z1 = 0.475 / (0.475 + EPS)
    assert result.advantages[2] == pytest.approx(base[2] / (1 + EPS), abs=1e-12)
    assert result.advantages[1] == pytest.approx((base[1] + 5 * z1) / (6 + EPS), abs=1e-12)
    np.testing.assert_array_equal(result.episode_advantages, 0.0)


def test_hgpo_equal_returns_are_dropped_exactly() -> None:
    """Three rows of one key with return 0.1 each (a float sum that is not exact): their value
    is exactly 0 and dropped, so the row keeps only its other key's value."""
    trajs = [
        traj("a", "g", ["x", "s"], [0, 0.1]),
        traj("b", "g", ["y", "s"], [0, 0.1]),
        traj("c", "g", ["z", "s"], [0, 0.1]),
        traj("d", "g", ["x", "s"], [0, 0.5]),
    ]
    # rows at t = 1: key (s) = [0.1, 0.1, 0.1, 0.5] (not all equal); key (x, s) = a1, d1.
    # rows at t = 0: x = a0, d0 with G = 0.095 and 0.475; y and z are singletons.
    result = _run(trajs, "hgpo", step_normalization="MEAN", gamma=1.0)
    assert result.advantages[2] == 0.0 and result.advantages[4] == 0.0  # singletons y, z
    tied = [traj("a", "g", ["s"], [0.1]), traj("b", "g", ["s"], [0.1]),
            traj("c", "g", ["s"], [0.1])]  # fmt: skip
    np.testing.assert_array_equal(_run(tied, "hgpo").advantages, 0.0)


def test_hgpo_is_gigpo_anchors_when_k_is_zero() -> None:
    """K = 0, MEAN: the only key is GiGPO's anchor, so A = (G - anchor mean) * 2^a / (2^a + eps)
    for every row whose value is not zero."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        trajs = _random_batch(rng, n_traj=6, n_groups=2, n_states=3, terminal=False)
        alpha = float(rng.choice([0.0, 1.0, 3.0]))
        hgpo = _run(trajs, "hgpo", hgpo_history_length=0, hgpo_alpha=alpha,
                    step_normalization="MEAN")  # fmt: skip
        gigpo = _run(trajs, "gigpo", step_weight=1.0)
        weight = 2.0**alpha / (2.0**alpha + EPS)
        np.testing.assert_allclose(hgpo.advantages, gigpo.step_advantages * weight, atol=1e-12)


# --- GraphGPO ------------------------------------------------------------------------------------


def test_graphgpo_worked_example() -> None:
    """Graph: s0->s1->s2->SUCCESS (a), s0->s1->s3->dead end (b), s0->s4->s2->SUCCESS (c).
    d: SUCCESS 0, s2 1, s1 2, s4 2, s0 3; s3 and b's dead end cannot reach SUCCESS: 3 + 1 = 4.
    G = 10 * 0.1^d(next), c1 minus 0.1: a [0.1, 1, 10], b [0.1, 0.001, 0.001], c [0.1, 0.9, 10].
    Anchors (MEAN_STD, unbiased): s0 all 0.1 -> 0; s1 = [1, 0.001] -> +-0.4995 / (0.999 / sqrt 2
    + 1e-6); s2 = [10, 10] -> 0; s3, s4 singletons -> 0. Episode: z-scores of the row scores
    [1, 1, 1, 0, 0, 0, 1, 0.9, 1]: 0.699059 (R = 1), -1.330467 (R = 0), 0.496106 (c1)."""
    result = _run(_example(), "graphgpo")
    np.testing.assert_allclose(
        result.returns, [0.1, 1, 10, 0.1, 0.001, 0.001, 0.1, 0.9, 10], rtol=1e-12, atol=0
    )
    z = 0.4995 / (0.999 / math.sqrt(2.0) + EPS)
    # s0's three returns 0.1 average to 0.1 only up to rounding: ~1e-11 after / (std + 1e-6)
    np.testing.assert_allclose(
        result.step_advantages, [0, z, 0, 0, -z, 0, 0, 0, 0], rtol=0, atol=1e-10
    )
    episode = [0.699059, 0.699059, 0.699059, -1.330467, -1.330467, -1.330467,
               0.699059, 0.496106, 0.699059]  # fmt: skip
    np.testing.assert_allclose(result.episode_advantages, episode, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        result.advantages, result.episode_advantages + result.step_advantages, atol=1e-15
    )
    # distinct states s0..s4: four reach SUCCESS at 3, 2, 1, 2 (mean 2); s3 cannot (1 of 5)
    np.testing.assert_allclose(result.groups.graph_mean_distance, [2.0], atol=1e-15)
    np.testing.assert_allclose(result.groups.graph_unreachable_fraction, [0.2], atol=1e-15)


def test_graphgpo_normalized_distance() -> None:
    """gamma^(d(next) - d(s) + 1): every step along a shortest path gets gamma^0 = 1 (G = 10),
    b1 (s1 at 2 -> s3 at 4) gets gamma^3 and the unreachable s3 -> dead end gamma^1."""
    result = _run(_example(), "graphgpo", graph_normalize_distance=True)
    np.testing.assert_allclose(
        result.returns, [10, 10, 10, 10, 0.01, 1, 10, 9.9, 10], rtol=1e-12, atol=1e-15
    )


def test_graphgpo_group_without_success() -> None:
    """No success: every node is at d = 1, so G = c * gamma - lambda * v, the anchor term is 0
    where no step is invalid, and every state counts as unreachable."""
    trajs = [traj("a", "g", ["s0", "s1"], [0, 0]), traj("b", "g", ["s0", "s2"], [0, 0])]
    result = _run(trajs, "graphgpo", graph_success_value=4.0, gamma=0.5)
    np.testing.assert_allclose(result.returns, [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(result.step_advantages, 0.0)
    np.testing.assert_array_equal(result.groups.graph_unreachable_fraction, [1.0])
    np.testing.assert_array_equal(result.groups.graph_mean_distance, [0.0])


def test_graphgpo_weights_set_to_zero_are_zero() -> None:
    """episode_weight 0 and graph_success_value 0 are zeros, not 'the preset's value'."""
    result = _run(_example(), "graphgpo", episode_weight=0.0)
    np.testing.assert_allclose(result.advantages, result.step_advantages, atol=1e-15)
    assert np.abs(result.episode_advantages).max() > 0.5  # still reported
    zero = _run(_example(), "graphgpo", graph_success_value=0.0)
    np.testing.assert_allclose(zero.returns, [0, 0, 0, 0, 0, 0, 0, -0.1, 0], atol=1e-15)


def test_graphgpo_returns_stay_within_success_value() -> None:
    """Random batches, both distance modes: 0 <= G + lambda*v <= c (the exponent is >= 0)."""
    rng = np.random.default_rng(11)
    for _ in range(30):
        trajs = _random_batch(rng, n_traj=8, n_groups=3, n_states=4, terminal=True)
        for normalize in (False, True):
            result = _run(trajs, "graphgpo", graph_normalize_distance=normalize,
                          gamma=float(rng.choice([0.0, 0.1, 0.9])))  # fmt: skip
            batch = StepBatch.from_trajectories(trajs)
            raw = result.returns + 0.1 * batch.invalid
            assert raw.min() >= 0.0 and raw.max() <= 10.0 + 1e-12
            assert np.isfinite(result.advantages).all()
            fractions = result.groups.graph_unreachable_fraction
            assert ((fractions >= 0) & (fractions <= 1)).all()


def test_state_keys_define_the_graph_and_the_history() -> None:
    """Exact identity is state_key when given: two texts with one key are one node / one key."""
    keyed = [
        traj("a", "g", ["s0 (seen at 9:01)", "s1"], [0, 1], state_keys=["s0", "s1"]),
        traj("b", "g", ["s0 (seen at 9:02)", "s2"], [0, 0], state_keys=["s0", "s2"]),
    ]
    plain = [traj("a", "g", ["s0", "s1"], [0, 1]), traj("b", "g", ["s0", "s2"], [0, 0])]
    for preset in ("hgpo", "graphgpo"):
        np.testing.assert_array_equal(
            _run(keyed, preset).advantages, _run(plain, preset).advantages
        )


# --- configuration -------------------------------------------------------------------------------


def test_presets_resolve_to_the_authors_defaults() -> None:
    hgpo = resolve_config("hgpo")
    assert hgpo.estimator is Estimator.HGPO
    assert (hgpo.gamma, hgpo.hgpo_history_length, hgpo.hgpo_alpha) == (0.95, 2, 1.0)
    assert hgpo.step_normalization.value == "MEAN_STD" and not hgpo.hgpo_base_group
    graph = resolve_config("graphgpo")
    assert graph.estimator is Estimator.GRAPHGPO
    assert (graph.gamma, graph.graph_success_value, graph.step_weight, graph.episode_weight) == (
        0.1, 10.0, 1.0, 1.0
    )
    assert not graph.graph_normalize_distance
    assert graph.episode_normalization.value == graph.step_normalization.value == "MEAN_STD"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hgpo_history_length": -1}, "config.hgpo_history_length"),
        ({"hgpo_history_length": 65}, "config.hgpo_history_length"),
        ({"hgpo_history_length": 1.5}, "config.hgpo_history_length"),
        ({"hgpo_history_length": True}, "config.hgpo_history_length"),
        ({"hgpo_alpha": 17.0}, "config.hgpo_alpha"),
        ({"hgpo_alpha": math.nan}, "config.hgpo_alpha"),
        ({"hgpo_base_group": 1}, "config.hgpo_base_group"),
        ({"graph_normalize_distance": "yes"}, "config.graph_normalize_distance"),
        ({"graph_success_value": -1.0}, "config.graph_success_value"),
        ({"graph_success_value": 1e16}, "config.graph_success_value"),
        ({"graph_success_value": math.inf}, "config.graph_success_value"),
        ({"episode_weight": -0.5}, "config.episode_weight"),
        ({"episode_weight": 2e6}, "config.episode_weight"),
    ],
)
def test_bad_values_name_their_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        resolve_config("hgpo", overrides)
    assert caught.value.field == field


def test_extreme_accepted_values_stay_finite() -> None:
    """The accepted corners: K 64, alpha +-16, c 1e15, episode_weight 1e6."""
    trajs = _example() + [traj("d", "g", ["s0", "s1", "s2"], [0, 0, 1e15])]
    for overrides in (
        {"hgpo_history_length": 64, "hgpo_alpha": 16.0, "hgpo_base_group": True},
        {"hgpo_alpha": -16.0, "hgpo_base_group": True},
    ):
        assert np.isfinite(_run(trajs, "hgpo", **overrides).advantages).all()
    for normalize in (False, True):
        result = _run(trajs, "graphgpo", graph_success_value=1e15, episode_weight=1e6,
                      step_weight=1e6, graph_normalize_distance=normalize, gamma=1.0)  # fmt: skip
        assert np.isfinite(result.advantages).all()
