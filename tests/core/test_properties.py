"""Property tests (hypothesis): invariances and limits every estimator must satisfy."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxmo.core import (
    PRESETS,
    AdvantageResult,
    Similarity,
    StateFeatures,
    StepBatch,
    TrajectoryInput,
    ValidationError,
    compute_advantages,
    dense_features,
    precomputed_features,
    resolve_config,
    tfidf_features,
)
from proxmo.core.batch import MAX_ABS_EMBEDDING, MAX_ABS_REWARD
from proxmo.core.config import (
    MAX_HISTORY_PRIOR,
    MAX_INVALID_ACTION_PENALTY,
    MAX_PSC_BETA,
    MAX_PSC_RANGE,
    MAX_STEP_WEIGHT,
)

from .helpers import features_for

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
STATE_POOL = [
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2.",
    "You arrive at fridge 1. The fridge 1 is closed.",
    "You open the fridge 1. The fridge 1 is open. In it, you see a apple 1.",
    "Nothing happens.",
    "You pick up the knife 1 from the countertop 1.",
]
REWARDS = st.one_of(st.sampled_from([0.0, 1.0, 10.0]), st.floats(-5, 10, allow_nan=False, width=32))


@st.composite
def trajectory_batches(draw: st.DrawFn, max_groups: int = 4) -> list[TrajectoryInput]:
    n_groups = draw(st.integers(1, max_groups))
    trajs: list[TrajectoryInput] = []
    for g in range(n_groups):
        for k in range(draw(st.integers(1, 4))):
            n = draw(st.integers(1, 5))
            states = draw(st.lists(st.sampled_from(STATE_POOL), min_size=n, max_size=n))
            rewards = draw(st.lists(REWARDS, min_size=n, max_size=n))
            invalid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            trajs.append(TrajectoryInput(f"g{g}-t{k}", f"g{g}", "", states, rewards, invalid))
    return trajs


def _run(trajs: list[TrajectoryInput], preset: str, **overrides: Any) -> AdvantageResult:
    cfg = resolve_config(preset, overrides, default_similarity=Similarity.ENCODER)
    batch = StepBatch.from_trajectories(trajs)
    return compute_advantages(batch, cfg, features=_features(batch, cfg))


def _features(batch: StepBatch, cfg: Any) -> StateFeatures | None:
    """Encoder stand-in keyed by the text itself, so it does not depend on batch order."""
    if cfg.similarity is Similarity.ENCODER and cfg.estimator.value == "PROXMO":
        vectors = np.stack([_text_vector(s) for s in batch.states])
        return dense_features(vectors, batch.row_state)
    return features_for(batch, cfg)


def _text_vector(text: str) -> np.ndarray:
    seed = sum((i + 1) * ord(c) for i, c in enumerate(text))
    return np.random.default_rng(seed).normal(size=8)


def _rows_of(trajs: list[TrajectoryInput]) -> dict[str, range]:
    out, start = {}, 0
    for tr in trajs:
        out[tr.trajectory_id] = range(start, start + len(tr.states))
        start += len(tr.states)
    return out


def _per_trajectory(result: AdvantageResult, trajs: list[TrajectoryInput]) -> dict[str, Any]:
    return {
        tid: np.stack(
            [
                result.advantages[list(rows)],
                result.episode_advantages[list(rows)],
                result.step_advantages[list(rows)],
                result.returns[list(rows)],
            ]
        )
        for tid, rows in _rows_of(trajs).items()
    }


@PROPERTY_SETTINGS
@given(trajs=trajectory_batches(), preset=st.sampled_from(list(PRESETS)), data=st.data())
def test_permuting_trajectories_permutes_output(
    trajs: list[TrajectoryInput], preset: str, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(trajs))
    before = _per_trajectory(_run(trajs, preset), trajs)
    after = _per_trajectory(_run(shuffled, preset), shuffled)
    for tid, values in before.items():
        np.testing.assert_allclose(after[tid], values, rtol=1e-9, atol=1e-9)


@PROPERTY_SETTINGS
@given(trajs=trajectory_batches(), preset=st.sampled_from(list(PRESETS)), data=st.data())
def test_permuting_groups_permutes_diagnostics(
    trajs: list[TrajectoryInput], preset: str, data: st.DataObject
) -> None:
    groups = list(dict.fromkeys(t.group_id for t in trajs))
    order = data.draw(st.permutations(groups))
    shuffled = [t for g in order for t in trajs if t.group_id == g]
    before, after = _run(trajs, preset).groups, _run(shuffled, preset).groups
    index = [groups.index(g) for g in order]
    for name in (
        "num_trajectories",
        "num_steps",
        "num_successes",
        "success_rate",
        "weight_success",
        "weight_failure",
        "singleton_fraction",
        "mean_effective_neighbors",
        "hgpo_long_history_fraction",
        "graph_mean_distance",
        "graph_unreachable_fraction",
    ):
        np.testing.assert_allclose(
            getattr(after, name), getattr(before, name)[index], rtol=1e-9, atol=1e-12
        )


@PROPERTY_SETTINGS
@given(
    first=trajectory_batches(max_groups=1),
    others=trajectory_batches(max_groups=3),
    preset=st.sampled_from(list(PRESETS)),
)
def test_a_group_ignores_other_groups(
    first: list[TrajectoryInput], others: list[TrajectoryInput], preset: str
) -> None:
    # rename the other groups so they are distinct from the first one
    others = [
        TrajectoryInput(
            f"o-{t.trajectory_id}", f"o-{t.group_id}", "", t.states, t.rewards, t.invalid
        )
        for t in others
    ]
    # TF-IDF couples groups through its vocabulary (tested below); use per-text vectors here
    tfidf = PRESETS[preset].values.get("similarity") in (None, Similarity.TFIDF)
    overrides = {"similarity": "ENCODER"} if tfidf else {}
    n_first = sum(len(t.states) for t in first)
    alone = _run(first, preset, **overrides)
    together = _run(first + others, preset, **overrides)
    for name in ("advantages", "episode_advantages", "step_advantages", "returns"):
        np.testing.assert_allclose(
            getattr(together, name)[:n_first], getattr(alone, name), rtol=1e-9, atol=1e-9
        )


@PROPERTY_SETTINGS
@given(first=trajectory_batches(max_groups=1), others=trajectory_batches(max_groups=3))
def test_tfidf_couples_groups_only_through_the_vocabulary(
    first: list[TrajectoryInput], others: list[TrajectoryInput]
) -> None:
    others = [
        TrajectoryInput(
            f"o-{t.trajectory_id}", f"o-{t.group_id}", "", t.states, t.rewards, t.invalid
        )
        for t in others
    ]
    cfg = resolve_config("paper")
    together_batch = StepBatch.from_trajectories(first + others)
    together_features = tfidf_features(together_batch)
    together = compute_advantages(together_batch, cfg, features=together_features)
    # the first group alone, given the feature vectors fitted on the whole batch
    alone_batch = StepBatch.from_trajectories(first)
    if together_features is None:
        alone_features = None
    else:
        position = {s: k for k, s in enumerate(together_batch.states)}
        rows = [position[s] for s in alone_batch.states]
        alone_features = StateFeatures(together_features.matrix[rows], alone_batch.row_state)
    alone = compute_advantages(alone_batch, cfg, features=alone_features)
    n_first = alone_batch.n_rows
    np.testing.assert_allclose(together.advantages[:n_first], alone.advantages, atol=1e-9)


@PROPERTY_SETTINGS
@given(trajs=trajectory_batches(), scope=st.sampled_from(["GROUP", "SAME_STEP"]))
def test_tau_limits(trajs: list[TrajectoryInput], scope: str) -> None:
    # distinct random vectors per text: only identical texts have cosine 1
    exact = _run(trajs, "paper", similarity="EXACT", scope=scope)
    cold = _run(trajs, "paper", similarity="ENCODER", tau=1e-6, scope=scope)
    np.testing.assert_allclose(cold.step_advantages, exact.step_advantages, atol=1e-9)
    np.testing.assert_allclose(
        cold.groups.mean_effective_neighbors, exact.groups.mean_effective_neighbors, atol=1e-9
    )
    hot = _run(trajs, "paper", similarity="ENCODER", tau=1e12, scope=scope)
    batch = StepBatch.from_trajectories(trajs)
    key = batch.row_group * 1000 + (batch.row_t if scope == "SAME_STEP" else 0)
    _, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=hot.returns)
    counts = np.bincount(inverse)
    np.testing.assert_allclose(
        hot.step_advantages, hot.returns - (sums / counts)[inverse], atol=1e-9
    )
    np.testing.assert_allclose(
        hot.groups.mean_effective_neighbors,
        np.bincount(batch.row_group, weights=counts[inverse]) / np.bincount(batch.row_group),
        rtol=1e-9,
    )


@PROPERTY_SETTINGS
@given(trajs=trajectory_batches())
def test_grpo_equals_verl(trajs: list[TrajectoryInput]) -> None:
    result = _run(trajs, "grpo")
    # verl compute_grpo_outcome_advantage: scores per uid; one sample -> mean 0, std 1;
    # (score - mean) / (std + eps), std unbiased (torch.std), eps 1e-6
    scores = np.array([sum(t.rewards) for t in trajs])
    by_group: dict[str, list[float]] = {}
    for t, s in zip(trajs, scores, strict=True):
        by_group.setdefault(t.group_id, []).append(float(s))
    expected = []
    for t, s in zip(trajs, scores, strict=True):
        values = np.array(by_group[t.group_id])
        mean, std = (0.0, 1.0) if len(values) == 1 else (values.mean(), values.std(ddof=1))
        expected.extend([(s - mean) / (std + 1e-6)] * len(t.states))
    np.testing.assert_allclose(result.advantages, expected, rtol=1e-9, atol=1e-9)


@PROPERTY_SETTINGS
@given(
    trajs=trajectory_batches(),
    scale=st.floats(0.01, 100.0),
    preset=st.sampled_from(["paper", "proxmo", "gigpo", "rloo"]),
)
def test_scaling_rewards_scales_mean_outputs(
    trajs: list[TrajectoryInput], scale: float, preset: str
) -> None:
    # MEAN normalization everywhere; lambda 0 (a fixed penalty does not scale); BATCH p, which
    # depends on R > 0 only, so PSC weights are unchanged by a positive scale
    overrides = {
        "episode_normalization": "MEAN",
        "step_normalization": "MEAN",
        "invalid_action_penalty": 0.0,
        "success_rate_source": "BATCH",
    }
    scaled = [
        TrajectoryInput(
            t.trajectory_id, t.group_id, "", t.states, [scale * r for r in t.rewards], t.invalid
        )
        for t in trajs
    ]
    base = _run(trajs, preset, **overrides)
    out = _run(scaled, preset, **overrides)
    for name in ("advantages", "episode_advantages", "step_advantages", "returns"):
        np.testing.assert_allclose(
            getattr(out, name), scale * getattr(base, name), rtol=1e-9, atol=1e-9 * scale
        )


# --- numerical safety (docs/algorithm.md section 5a): extreme finite inputs within the ranges ----

SUBNORMAL = 5e-324
EXTREME_REWARDS = st.one_of(
    st.sampled_from([MAX_ABS_REWARD, -MAX_ABS_REWARD, 1e-300, -1e-300, SUBNORMAL, -SUBNORMAL,
                     2.2250738585072014e-308, -0.0, 0.0, 1.0]),
    st.floats(-MAX_ABS_REWARD, MAX_ABS_REWARD, allow_nan=False),
)
# Every numeric config field at its bounds (and tiny / huge where it has no upper bound).
EDGE_CONFIG = {
    "gamma": [0.0, 1.0, -0.0, SUBNORMAL],
    "tau": [SUBNORMAL, 1e-300, 1e-12, 1e308],
    "step_weight": [0.0, MAX_STEP_WEIGHT, SUBNORMAL],
    "psc_alpha": [SUBNORMAL, 1e-300, 1e308],
    "psc_range": [0.0, MAX_PSC_RANGE, SUBNORMAL],
    "invalid_action_penalty": [0.0, MAX_INVALID_ACTION_PENALTY, SUBNORMAL],
    "success_threshold": [-1e308, 1e308, -0.0, SUBNORMAL],
    "history_half_life": [SUBNORMAL, 1e308],
    "history_prior": [0.0, MAX_HISTORY_PRIOR],
}
# ... and beyond them: each must be refused naming its field.
BEYOND_CONFIG = {
    "gamma": [-SUBNORMAL, 1.0000000000000002, 1e308],
    "tau": [0.0, -0.0, -SUBNORMAL],
    "step_weight": [-SUBNORMAL, MAX_STEP_WEIGHT * (1 + 1e-12)],
    "psc_alpha": [0.0, -1.0],
    "psc_beta": [-SUBNORMAL, MAX_PSC_BETA * (1 + 1e-12), 1e308],
    "psc_range": [-SUBNORMAL, 1.0000000000000002],
    "invalid_action_penalty": [-SUBNORMAL, MAX_INVALID_ACTION_PENALTY * (1 + 1e-12)],
    "history_half_life": [0.0, -1.0],
    "history_prior": [-SUBNORMAL, MAX_HISTORY_PRIOR * (1 + 1e-12), 1e308],
}


@st.composite
def extreme_batches(draw: st.DrawFn) -> list[TrajectoryInput]:
    """Groups of one trajectory of one step, very long and very short trajectories, rewards at
    the bound, subnormal and -0.0, state embeddings with extreme values."""
    trajs: list[TrajectoryInput] = []
    dim = 4
    embedding_values = st.sampled_from([MAX_ABS_EMBEDDING, -MAX_ABS_EMBEDDING, SUBNORMAL, -0.0,
                                        1e-300, 1.0, 0.0])
    for g in range(draw(st.integers(1, 3))):
        for k in range(draw(st.sampled_from([1, 1, 2, 5]))):
            n = draw(st.sampled_from([1, 1, 2, 3, 200]))
            states = [STATE_POOL[(g + k + t) % 3] for t in range(n)]
            rewards = draw(st.lists(EXTREME_REWARDS, min_size=n, max_size=n))
            invalid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            vectors = [draw(st.lists(embedding_values, min_size=dim, max_size=dim))
                       for _ in range(n)]
            trajs.append(TrajectoryInput(f"g{g}-t{k}", f"g{g}", "", states, rewards, invalid,
                                         embeddings=vectors))
    return trajs


def _assert_finite_and_shaped(result: AdvantageResult, batch: StepBatch) -> None:
    for name in ("advantages", "episode_advantages", "step_advantages", "returns"):
        values = getattr(result, name)
        assert values.shape == (batch.n_rows,), name
        assert np.isfinite(values).all(), (name, values)
    for name in ("success_rate", "weight_success", "weight_failure", "singleton_fraction",
                 "mean_effective_neighbors"):
        values = getattr(result.groups, name)
        assert values.shape == (batch.n_groups,) and np.isfinite(values).all(), (name, values)


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(
    trajs=extreme_batches(),
    preset=st.sampled_from(list(PRESETS)),
    similarity=st.sampled_from(["TFIDF", "PRECOMPUTED", "EXACT", "ENCODER"]),
    edges=st.dictionaries(st.sampled_from(list(EDGE_CONFIG)), st.integers(0, 3)),
    history=st.none() | st.sampled_from([0.0, 1.0, SUBNORMAL]),
)
def test_extreme_accepted_inputs_give_finite_results(
    trajs: list[TrajectoryInput], preset: str, similarity: str, edges: dict[str, int],
    history: float | None,
) -> None:
    overrides: dict[str, Any] = {
        name: EDGE_CONFIG[name][i % len(EDGE_CONFIG[name])] for name, i in edges.items()}
    overrides["similarity"] = similarity
    cfg = resolve_config(preset, overrides)  # every value is within its range
    batch = StepBatch.from_trajectories(trajs)
    features = (precomputed_features(batch) if similarity == "PRECOMPUTED"
                else _features(batch, cfg))
    rates = None if history is None else np.full(batch.n_groups, history)
    result = compute_advantages(batch, cfg, features=features, group_success_rate=rates)
    _assert_finite_and_shaped(result, batch)


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(field=st.sampled_from(list(BEYOND_CONFIG)), data=st.data(),
       preset=st.sampled_from(list(PRESETS)))
def test_config_values_beyond_their_range_name_the_field(
    field: str, data: st.DataObject, preset: str
) -> None:
    value = data.draw(st.sampled_from(BEYOND_CONFIG[field]))
    try:
        resolve_config(preset, {field: value})
    except ValidationError as error:
        assert error.field == f"config.{field}", error
    else:
        raise AssertionError(f"{field}={value!r} accepted")


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(value=st.one_of(
    st.sampled_from([1e308, -1e308, MAX_ABS_REWARD * (1 + 1e-12), float("inf"), float("nan")]),
    st.floats(min_value=MAX_ABS_REWARD * (1 + 1e-12), allow_infinity=True)),
    sign=st.sampled_from([1.0, -1.0]), where=st.integers(0, 2))
def test_rewards_beyond_the_bound_name_the_step(value: float, sign: float, where: int) -> None:
    rewards = [0.0, 0.0, 0.0]
    rewards[where] = sign * value
    trajs = [TrajectoryInput("a", "g", "", ["x", "y", "z"], [0.0] * 3, [False] * 3),
             TrajectoryInput("b", "g", "", ["x", "y", "z"], rewards, [False] * 3)]
    try:
        StepBatch.from_trajectories(trajs)
    except ValidationError as error:
        assert error.field == f"trajectories[1].steps[{where}].reward", error
    else:
        raise AssertionError(f"reward {sign * value!r} accepted")
