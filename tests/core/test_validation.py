"""Each bad input gives one ValidationError naming the field (and index)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from proxmo.core import (
    StepBatch,
    TrajectoryInput,
    ValidationError,
    compute_advantages,
    precomputed_features,
    resolve_config,
)

from .helpers import traj


def _good() -> list[TrajectoryInput]:
    return [
        traj("a", "g", ["s0", "s1"], [0.0, 1.0]),
        traj("b", "g", ["s0", "s2", "s3"], [0.0, 0.0, 0.0]),
        traj("c", "h", ["s0"], [1.0]),
    ]


def _error(trajs: list[TrajectoryInput]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        StepBatch.from_trajectories(trajs)
    err = info.value
    assert str(err) == f"{err.field}: {err.message}"
    return err


def _replace(index: int, **changes: Any) -> list[TrajectoryInput]:
    trajs = _good()
    old = trajs[index]
    fields = {**old.__dict__, **changes}
    trajs[index] = TrajectoryInput(**fields)
    return trajs


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward(bad: float) -> None:
    err = _error(_replace(1, rewards=[0.0, 0.0, bad]))
    assert err.field == "trajectories[1].steps[2].reward"


def test_trajectory_without_steps() -> None:
    err = _error(_replace(2, states=[], rewards=[], invalid=[]))
    assert err.field == "trajectories[2].steps"


def test_duplicate_trajectory_id() -> None:
    err = _error(_replace(2, trajectory_id="a"))
    assert err.field == "trajectories[2].trajectory_id"
    assert "trajectories[0]" in err.message


def test_empty_ids() -> None:
    assert _error(_replace(1, trajectory_id="")).field == "trajectories[1].trajectory_id"
    assert _error(_replace(2, group_id="")).field == "trajectories[2].group_id"


def test_no_trajectories() -> None:
    assert _error([]).field == "trajectories"


def test_task_id_must_agree_within_group() -> None:
    trajs = _replace(0, task_id="task-x")
    err = _error(trajs)  # trajectory 1 is in group g with the default task_id "g"
    assert err.field == "trajectories[1].task_id"


def test_length_mismatch() -> None:
    assert _error(_replace(0, rewards=[0.0])).field == "trajectories[0].rewards"
    assert _error(_replace(0, invalid=[False])).field == "trajectories[0].invalid"


def test_non_finite_embedding() -> None:
    trajs = _replace(1, embeddings=[[0.1, 0.2], [0.3, math.nan], [0.0, 1.0]])
    assert _error(trajs).field == "trajectories[1].steps[1].state_embedding"


def test_embeddings_of_different_sizes() -> None:
    within = _replace(1, embeddings=[[0.1, 0.2], [0.3, 0.4, 0.5], [0.0, 1.0]])
    assert _error(within).field == "trajectories[1].steps[1].state_embedding"
    trajs = _replace(0, embeddings=[[0.1, 0.2], [0.3, 0.4]])
    first = trajs[0]
    trajs[1] = TrajectoryInput(**{**trajs[1].__dict__, "embeddings": [[1.0, 2.0, 3.0]] * 3})
    err = _error([first, trajs[1], trajs[2]])
    assert err.field == "trajectories[1].steps[0].state_embedding"
    assert "trajectories[0].steps[0]" in err.message


def test_with_several_errors_the_first_in_request_order_is_named() -> None:
    """Rewards are checked in one pass at the end; a later error must not hide an earlier one."""
    trajs = _replace(0, rewards=[0.0, math.nan])
    trajs[2] = TrajectoryInput(**{**trajs[2].__dict__, "trajectory_id": "a"})
    assert _error(trajs).field == "trajectories[0].steps[1].reward"
    trajs = _replace(1, rewards=[0.0, 2e15, 0.0], embeddings=[[0.1], [math.nan], [0.2]])
    assert _error(trajs).field == "trajectories[1].steps[1].reward"  # before its embeddings
    trajs = _replace(0, embeddings=[[0.1], [math.inf]])
    trajs[1] = TrajectoryInput(**{**trajs[1].__dict__, "rewards": [math.nan] * 3})
    assert _error(trajs).field == "trajectories[0].steps[1].state_embedding"
    trajs = _replace(1, rewards=[0.0, 0.0, "x"])  # type: ignore[list-item]
    trajs[0] = TrajectoryInput(**{**trajs[0].__dict__, "rewards": [-math.inf, 0.0]})
    assert _error(trajs).field == "trajectories[0].steps[0].reward"


def test_missing_embeddings_for_precomputed() -> None:
    trajs = _good()
    trajs[0] = TrajectoryInput(**{**trajs[0].__dict__, "embeddings": [[0.1, 0.2], [0.3, 0.4]]})
    trajs[1] = TrajectoryInput(**{**trajs[1].__dict__, "embeddings": [[0.1, 0.2], [], [0.3, 0.4]]})
    batch = StepBatch.from_trajectories(trajs)  # fine unless PRECOMPUTED is asked for
    with pytest.raises(ValidationError) as info:
        precomputed_features(batch)
    assert info.value.field == "trajectories[1].steps[1].state_embedding"
    # a trajectory with no embeddings at all: its first step is named
    trajs[1] = _good()[1]
    with pytest.raises(ValidationError) as info:
        precomputed_features(StepBatch.from_trajectories(trajs))
    assert info.value.field == "trajectories[1].steps[0].state_embedding"


@pytest.mark.parametrize(
    ("preset", "overrides", "field"),
    [
        ("nope", {}, "config.preset"),
        ("paper", {"tau": 0.0}, "config.tau"),
        ("paper", {"tau": -1.0}, "config.tau"),
        ("paper", {"gamma": 1.5}, "config.gamma"),
        ("paper", {"gamma": -0.1}, "config.gamma"),
        ("paper", {"psc_beta": 0.1, "psc_range": 0.05}, "config.psc_range"),
        ("paper", {"psc_range": -0.1}, "config.psc_range"),
        ("paper", {"similarity": "COSINE"}, "config.similarity"),
        ("paper", {"estimator": "PPO"}, "config.estimator"),
        ("paper", {"gamma": math.nan}, "config.gamma"),
        ("paper", {"gamma": "0.9"}, "config.gamma"),
        ("paper", {"psc_enabled": 1}, "config.psc_enabled"),
        ("paper", {"psc_alpha": 0.0}, "config.psc_alpha"),
        ("paper", {"history_half_life": 0.0}, "config.history_half_life"),
        ("paper", {"history_prior": -1.0}, "config.history_prior"),
        ("paper", {"invalid_action_penalty": -0.1}, "config.invalid_action_penalty"),
        ("paper", {"colour": "red"}, "config.colour"),
    ],
)
def test_config_errors(preset: str, overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        resolve_config(preset, overrides)
    assert info.value.field == field


def test_bad_group_success_rate() -> None:
    batch = StepBatch.from_trajectories(_good())
    cfg = resolve_config("proxmo", {"similarity": "EXACT"})
    with pytest.raises(ValidationError) as info:
        compute_advantages(batch, cfg, group_success_rate=np.array([0.5, 1.5]))
    assert info.value.field == "group_success_rate[1]"
    with pytest.raises(ValidationError) as info:
        compute_advantages(batch, cfg, group_success_rate=np.array([0.5]))
    assert info.value.field == "group_success_rate"


def test_valid_input_is_accepted() -> None:
    batch = StepBatch.from_trajectories(_good())
    assert batch.n_rows == 6 and batch.n_traj == 3 and batch.n_groups == 2
    assert batch.group_task == ("g", "h")
    assert batch.states == ("s0", "s1", "s2", "s3")
    assert batch.row_t.tolist() == [0, 1, 0, 1, 2, 0]
