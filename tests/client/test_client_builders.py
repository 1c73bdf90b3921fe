"""Request builders: plain Python / numpy in, proto out, answers mapped back onto rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxmo_client import (
    BuildError,
    RowBookkeeping,
    advantages_to_rows,
    build_config,
    build_request,
    parse_enum,
    trajectories_from_rows,
)
from proxmo_client.v1 import proxmo_pb2 as pb


def fake_response(request_or_trajectories) -> pb.ComputeAdvantagesResponse:
    """What a server would answer if the advantage of a step were the number in its state text."""
    trajectories = getattr(request_or_trajectories, "trajectories", request_or_trajectories)
    response = pb.ComputeAdvantagesResponse()
    for trajectory in trajectories:
        values = [float(step.state.split("-")[1]) for step in trajectory.steps]
        response.trajectories.add(
            trajectory_id=trajectory.trajectory_id,
            advantages=values,
            returns=[-v for v in values],
        )
    return response


def test_build_request_round_trip():
    embeddings = np.arange(6, dtype=np.float64).reshape(3, 2) / 10
    request = build_request(
        [
            {
                "trajectory_id": "t0",
                "group_id": "g0",
                "task_id": "task-A",
                "states": ["a", "b", "c"],
                "rewards": np.array([0.0, 0.5, 1.0]),
                "invalid": [False, True, False],
                "success": True,
                "state_keys": ["ka", "kb", "kc"],
                "embeddings": embeddings,
            },
            {"trajectory_id": 7, "group_id": "g0", "states": ["a"], "rewards": [2]},
            pb.Trajectory(trajectory_id="t2", group_id="g1", steps=[pb.Step(state="z")]),
        ],
        preset="paper",
        request_id="rid",
        dry_run=True,
        gamma=0.95,
        psc_enabled=False,
        similarity="precomputed",
        episode_normalization="mean_std",
        stats_unit=pb.STATS_UNIT_STEP,
        tau=None,
    )
    parsed = pb.ComputeAdvantagesRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert request.request_id == "rid" and request.dry_run
    first, second, third = request.trajectories
    assert (first.trajectory_id, first.group_id, first.task_id) == ("t0", "g0", "task-A")
    assert first.HasField("success") and first.success
    assert [s.state for s in first.steps] == ["a", "b", "c"]
    assert [s.reward for s in first.steps] == [0.0, 0.5, 1.0]
    assert [s.invalid_action for s in first.steps] == [False, True, False]
    assert [s.state_key for s in first.steps] == ["ka", "kb", "kc"]
    np.testing.assert_allclose(
        [list(s.state_embedding) for s in first.steps], embeddings, rtol=1e-6
    )
    assert second.trajectory_id == "7" and not second.HasField("success")
    assert third.trajectory_id == "t2"
    config = request.config
    assert config.preset == "paper"
    assert config.HasField("gamma") and config.gamma == 0.95
    assert config.HasField("psc_enabled") and not config.psc_enabled
    assert not config.HasField("tau")
    assert config.similarity == pb.SIMILARITY_PRECOMPUTED
    assert config.episode_normalization == pb.NORMALIZATION_MEAN_STD
    assert config.stats_unit == pb.STATS_UNIT_STEP


def test_fresh_request_ids():
    trajectories = [{"trajectory_id": "a", "group_id": "g", "states": ["s"], "rewards": [1]}]
    assert build_request(trajectories).request_id != build_request(trajectories).request_id


@pytest.mark.parametrize(
    ("enum", "value", "expected"),
    [
        ("Estimator", "proxmo", pb.ESTIMATOR_PROXMO),
        ("Estimator", "ESTIMATOR_GIGPO", pb.ESTIMATOR_GIGPO),
        ("Normalization", "MEAN_STD", pb.NORMALIZATION_MEAN_STD),
        ("Normalization", "mean-std", pb.NORMALIZATION_MEAN_STD),
        ("Similarity", "tfidf", pb.SIMILARITY_TFIDF),
        ("SuccessRateSource", "row_mean", pb.SUCCESS_RATE_SOURCE_ROW_MEAN),
        ("Scope", 2, pb.SCOPE_SAME_STEP),
        ("StatsUnit", np.int64(1), pb.STATS_UNIT_TRAJECTORY),
    ],
)
def test_parse_enum(enum, value, expected):
    assert parse_enum(enum, value) == expected


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"similarity": "cosine"}, "config.similarity", "expected one of tfidf, encoder"),
        ({"scope": 9}, "config.scope", "no value numbered 9"),
        ({"gama": 0.9}, "config.gama", "unknown config field"),
        ({"gamma": "0.9"}, "config.gamma", "expected a number"),
        ({"tau": float("nan")}, "config.tau", "must be finite"),
        ({"psc_enabled": 1}, "config.psc_enabled", "expected a bool"),
    ],
)
def test_bad_config(overrides, field, message):
    with pytest.raises(BuildError) as info:
        build_config("proxmo", **overrides)
    assert info.value.field == field
    assert message in info.value.message
    assert str(info.value).startswith(f"{field}: ")


GOOD = {"trajectory_id": "a", "group_id": "g", "states": ["s0", "s1"], "rewards": [0.0, 1.0]}


@pytest.mark.parametrize(
    ("trajectories", "field"),
    [
        ([], "trajectories"),
        ({"trajectory_id": "a"}, "trajectories"),
        ([GOOD, "nope"], "trajectories[1]"),
        ([GOOD, {**GOOD, "trajectory_id": "b", "rewards": [0.0, float("nan")]}],
         "trajectories[1].rewards[1]"),
        ([{**GOOD, "rewards": [0.0]}], "trajectories[0].rewards"),
        ([{**GOOD, "rewards": [0.0, "x"]}], "trajectories[0].rewards[1]"),
        ([{**GOOD, "rewards": [True, False]}], "trajectories[0].rewards[0]"),
        ([{**GOOD, "states": ["s0", 3]}], "trajectories[0].states[1]"),
        ([{**GOOD, "states": "s0s1"}], "trajectories[0].states"),
        ([{**GOOD, "states": [], "rewards": []}], "trajectories[0].states"),
        ([{k: v for k, v in GOOD.items() if k != "group_id"}], "trajectories[0].group_id"),
        ([{k: v for k, v in GOOD.items() if k != "rewards"}], "trajectories[0].rewards"),
        ([{**GOOD, "group_id": ""}], "trajectories[0].group_id"),
        ([{**GOOD, "invalid": [False]}], "trajectories[0].invalid"),
        ([{**GOOD, "invalid": [False, 2]}], "trajectories[0].invalid[1]"),
        ([{**GOOD, "success": "yes"}], "trajectories[0].success"),
        ([{**GOOD, "embeddings": np.zeros((3, 4))}], "trajectories[0].embeddings"),
        ([{**GOOD, "embeddings": [[0.0], [np.inf]]}], "trajectories[0].embeddings[1]"),
        ([{**GOOD, "reward": [1, 2]}], "trajectories[0].reward"),
        ([GOOD, GOOD], "trajectories[1].trajectory_id"),
    ],
)  # fmt: skip
def test_bad_trajectories_name_the_field(trajectories, field):
    with pytest.raises(BuildError) as info:
        build_request(trajectories)
    assert info.value.field == field


def rows_layout(traj_lengths: list[int], order: np.ndarray):
    """Rows of trajectories t0, t1, ... (t_k has traj_lengths[k] steps) listed in ``order``.

    The state text of a row is "row-<its position in the shuffled list>".
    """
    traj = np.repeat(np.arange(len(traj_lengths)), traj_lengths)
    step = np.concatenate([np.arange(n) for n in traj_lengths])
    traj, step = traj[order], step[order]
    return {
        "group_ids": [f"g{k % 2}" for k in traj],
        "trajectory_ids": [f"t{k}" for k in traj],
        "states": [f"row-{r}" for r in range(len(order))],
        "rewards": step.astype(float),
        "step_index": step,
    }


def test_rows_in_trajectory_major_order():
    layout = rows_layout([2, 3], np.arange(5))
    trajectories, rows = trajectories_from_rows(
        layout["group_ids"], layout["trajectory_ids"], layout["states"], layout["rewards"]
    )
    assert [t.trajectory_id for t in trajectories] == ["t0", "t1"]
    assert [t.group_id for t in trajectories] == ["g0", "g1"]
    assert [[s.state for s in t.steps] for t in trajectories] == [
        ["row-0", "row-1"],
        ["row-2", "row-3", "row-4"],
    ]
    assert rows.trajectory_ids == ("t0", "t1")
    assert rows.row_trajectory.tolist() == [0, 0, 1, 1, 1]
    assert rows.row_step.tolist() == [0, 1, 0, 1, 2]
    assert rows.num_steps.tolist() == [2, 3]


@pytest.mark.parametrize("use_step_index", [False, True])
def test_shuffled_rows_map_back_to_row_order(use_step_index: bool):
    lengths = [3, 1, 4, 2, 5]
    rng = np.random.default_rng(7)
    if use_step_index:
        order = rng.permutation(sum(lengths))  # steps out of time order: needs step_index
    else:
        # Step-major (all step-0 rows, then all step-1 rows ...), as a vectorized env emits them.
        order = np.argsort(np.concatenate([np.arange(n) for n in lengths]), kind="stable")
    layout = rows_layout(lengths, order)
    trajectories, rows = trajectories_from_rows(
        layout["group_ids"],
        np.array(layout["trajectory_ids"]),
        layout["states"],
        layout["rewards"],
        step_index=layout["step_index"] if use_step_index else None,
    )
    # Every trajectory's steps are in time order (reward == step index here).
    for trajectory in trajectories:
        assert [s.reward for s in trajectory.steps] == list(range(len(trajectory.steps)))
    request = build_request(trajectories)
    per_row = advantages_to_rows(fake_response(request), rows)
    np.testing.assert_array_equal(per_row, np.arange(len(order)))
    returns = advantages_to_rows(fake_response(request), rows, field="returns")
    np.testing.assert_array_equal(returns, -np.arange(len(order)))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_row_order_round_trips(lengths: list[int], seed: int):
    order = np.random.default_rng(seed).permutation(sum(lengths))
    layout = rows_layout(lengths, order)
    trajectories, rows = trajectories_from_rows(
        layout["group_ids"],
        layout["trajectory_ids"],
        layout["states"],
        layout["rewards"],
        step_index=layout["step_index"],
    )
    assert sorted(t.trajectory_id for t in trajectories) == sorted(
        {f"t{k}" for k in range(len(lengths))}
    )
    np.testing.assert_array_equal(
        advantages_to_rows(fake_response(trajectories), rows), np.arange(len(order))
    )


def test_per_trajectory_fields_from_rows():
    trajectories, _ = trajectories_from_rows(
        ["g", "g", "g"],
        ["a", "b", "a"],
        ["x", "y", "z"],
        [0, 1, 2],
        invalid=np.array([0, 1, 0]),
        task_ids=["T", "T", "T"],
        success=[True, False, True],
        state_keys=["k1", "k2", "k3"],
        embeddings=np.eye(3, dtype=np.float32),
    )
    a, b = trajectories
    assert a.task_id == "T" and a.success and not b.success
    assert [s.invalid_action for s in a.steps] == [False, False]
    assert b.steps[0].invalid_action
    assert [s.state_key for s in a.steps] == ["k1", "k3"]
    assert list(a.steps[1].state_embedding) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"group_ids": ["g", "h", "g"]}, "group_ids[1]", "'a' has 'g' at row 0"),
        ({"rewards": [0.0, 1.0]}, "rewards", "has 2 entries, expected 3"),
        ({"rewards": [0.0, np.nan, 1.0]}, "rewards[1]", "finite"),
        ({"states": ["x", None, "z"]}, "states[1]", "expected a string"),
        ({"step_index": [0, 0, 1]}, "step_index[1]", "0..2 once each; got 0 where 1"),
        ({"step_index": [0, 3, 1]}, "step_index[1]", "0..2 once each; got 3 where 2"),
        ({"step_index": [0.0, 1.0, 2.0]}, "step_index", "expected integers"),
        ({"success": [True, False, True]}, "success[1]", "has True at row 0"),
        ({"trajectory_ids": ["a", None, "a"]}, "trajectory_ids[1]", "expected a string id"),
        ({"embeddings": np.zeros((2, 4))}, "embeddings", "expected shape (3, dim >= 1)"),
        ({"trajectory_ids": np.array([["a", "a", "a"]])}, "trajectory_ids", "one entry per row"),
    ],
)
def test_bad_rows_name_the_row(changes, field, message):
    arguments = {
        "group_ids": ["g", "g", "g"],
        "trajectory_ids": ["a", "a", "a"],
        "states": ["x", "y", "z"],
        "rewards": [0.0, 1.0, 2.0],
    }
    arguments.update(changes)
    with pytest.raises(BuildError) as info:
        trajectories_from_rows(**arguments)
    assert info.value.field == field
    assert message in info.value.message


def test_advantages_to_rows_rejects_a_mismatched_response():
    trajectories, rows = trajectories_from_rows(["g", "g"], ["a", "b"], ["row-0", "row-1"], [0, 0])
    response = fake_response(trajectories)
    del response.trajectories[1]
    with pytest.raises(BuildError, match="no entry for trajectory 'b'"):
        advantages_to_rows(response, rows)
    response = fake_response(trajectories)
    response.trajectories[0].advantages.append(9.0)
    with pytest.raises(BuildError) as info:
        advantages_to_rows(response, rows)
    assert info.value.field == "response.trajectories['a'].advantages"
    with pytest.raises(BuildError, match="unknown result field"):
        advantages_to_rows(fake_response(trajectories), rows, field="weights")  # type: ignore[arg-type]
    assert isinstance(rows, RowBookkeeping) and rows.num_rows == 2
