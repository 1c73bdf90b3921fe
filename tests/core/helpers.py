"""Small builders shared by the core tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from proxmo.core import (
    AdvantageResult,
    EstimatorConfig,
    Similarity,
    StateFeatures,
    StepBatch,
    TrajectoryInput,
    compute_advantages,
    dense_features,
    precomputed_features,
    required_features,
    tfidf_features,
)


def traj(
    trajectory_id: str,
    group_id: str,
    states: Sequence[str],
    rewards: Sequence[float],
    *,
    invalid: Sequence[bool] | None = None,
    success: bool | None = None,
    task_id: str = "",
    state_keys: Sequence[str] | None = None,
    embeddings: Sequence[Sequence[float]] | None = None,
) -> TrajectoryInput:
    return TrajectoryInput(
        trajectory_id=trajectory_id,
        group_id=group_id,
        task_id=task_id,
        states=list(states),
        rewards=list(rewards),
        invalid=list(invalid) if invalid is not None else [False] * len(states),
        state_keys=state_keys,
        embeddings=embeddings,
        success=success,
    )


def state_embeddings(batch: StepBatch, dim: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed random vector per distinct state text (an encoder stand-in for core tests)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(len(batch.states), dim))


def features_for(batch: StepBatch, cfg: EstimatorConfig, *, seed: int = 0) -> StateFeatures | None:
    """The features the engine would build for cfg (ENCODER: seeded vectors per state text)."""
    kind = required_features(cfg)
    if kind is Similarity.TFIDF:
        return tfidf_features(batch)
    if kind is Similarity.ENCODER:
        return dense_features(state_embeddings(batch, seed=seed), batch.row_state)
    if kind is Similarity.PRECOMPUTED:
        return precomputed_features(batch)
    return None


def run(
    trajs: Sequence[TrajectoryInput],
    cfg: EstimatorConfig,
    *,
    group_success_rate: np.ndarray | None = None,
) -> tuple[StepBatch, AdvantageResult]:
    batch = StepBatch.from_trajectories(trajs)
    result = compute_advantages(
        batch, cfg, features=features_for(batch, cfg), group_success_rate=group_success_rate
    )
    return batch, result
