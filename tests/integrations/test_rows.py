"""Row/step/token bookkeeping of proxmo_client.integrations.rows (runs in every venv)."""

from __future__ import annotations

import numpy as np
import pytest
from integration_batches import StepRows, rollout_rows, shuffled_with_copies
from proxmo_client import BuildError, ProxmoClient, build_request
from proxmo_client.integrations.rows import (
    advantages_for_rows,
    derive_step_index,
    rows_to_request,
    token_advantages_for_rows,
)
from proxmo_client.v1 import proxmo_pb2 as pb


def answer_by_position(request: pb.ComputeAdvantagesRequest) -> pb.ComputeAdvantagesResponse:
    """A response whose advantage of step t of request trajectory i is 100*i + t (+0.5), so any
    value says exactly which step it came from; returns = -(that)."""
    response = pb.ComputeAdvantagesResponse(request_id=request.request_id)
    for i, trajectory in enumerate(request.trajectories):
        values = [100.0 * i + t + 0.5 for t in range(len(trajectory.steps))]
        response.trajectories.add(
            trajectory_id=trajectory.trajectory_id,
            advantages=values,
            returns=[-v for v in values],
        )
    return response


def request_rows(rows: StepRows, **kwargs: object) -> tuple[pb.ComputeAdvantagesRequest, object]:
    return rows_to_request(
        rows.uid, rows.traj_uid, rows.anchor_obs, rows.rewards,
        invalid=~rows.is_action_valid, preset="paper", **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def expected_value(request: pb.ComputeAdvantagesRequest, traj_uid: str, step: int) -> float:
    ids = [t.trajectory_id for t in request.trajectories]
    return 100.0 * ids.index(traj_uid) + step + 0.5


def test_each_step_lands_on_its_own_tokens() -> None:
    """The SkyRL bug class: every step's scalar on its own row's mask, never another step's."""
    rows = rollout_rows()
    request, plan = request_rows(rows)
    response = answer_by_position(request)
    tokens = token_advantages_for_rows(response, plan, rows.response_mask)
    assert tokens.shape == rows.response_mask.shape
    for r in range(rows.num_rows):
        value = expected_value(request, rows.traj_uid[r], int(rows.step_index[r]))
        on = rows.response_mask[r] == 1
        np.testing.assert_array_equal(tokens[r, on], value)
        np.testing.assert_array_equal(tokens[r, ~on], 0.0)
    # Rows of one trajectory carry different values on different spans: a broadcast that reused
    # the last step's mask (or value) for every step would fail here.
    last = {t: r for r, t in enumerate(rows.traj_uid)}
    first = {t: r for r, t in reversed(list(enumerate(rows.traj_uid)))}
    checked = 0
    for tid in last:
        r0, r1 = first[tid], last[tid]
        if r0 != r1 and rows.response_mask[r0].any():
            assert not np.array_equal(tokens[r0], tokens[r1])
            checked += 1
    assert checked >= 4


def test_request_matches_trajectory_layout() -> None:
    rows = rollout_rows()
    request, plan = request_rows(rows)
    direct = build_request(rows.trajectories(), preset="paper", request_id=request.request_id)
    assert request == direct
    assert plan.num_duplicates == 0
    np.testing.assert_array_equal(plan.row_step, rows.step_index)


def test_shuffled_rows_with_step_index() -> None:
    rows = rollout_rows()
    order = np.random.default_rng(5).permutation(rows.num_rows)
    shuffled = rows.take(order)
    request, plan = request_rows(shuffled, step_index=shuffled.step_index)
    # Same steps in time order per trajectory as the unshuffled batch (trajectory order may
    # differ: trajectories are numbered by first appearance).
    canonical = {t["trajectory_id"]: t for t in rows.trajectories()}
    for trajectory in request.trajectories:
        want = canonical[trajectory.trajectory_id]
        assert [s.state for s in trajectory.steps] == want["states"]
        assert [s.reward for s in trajectory.steps] == want["rewards"]
        assert [s.invalid_action for s in trajectory.steps] == want["invalid"]
    response = answer_by_position(request)
    values = advantages_for_rows(response, plan)
    for r in range(shuffled.num_rows):
        assert values[r] == expected_value(request, shuffled.traj_uid[r], shuffled.step_index[r])
    np.testing.assert_array_equal(advantages_for_rows(response, plan, "returns"), -values)


def test_shuffled_rows_without_step_index_use_row_order() -> None:
    """Without step indices a trajectory's steps are its rows in row order (documented)."""
    rows = rollout_rows()
    order = np.random.default_rng(6).permutation(rows.num_rows)
    request, plan = request_rows(rows.take(order))
    for trajectory in request.trajectories:
        in_row_order = [
            rows.anchor_obs[r] for r in order if rows.traj_uid[r] == trajectory.trajectory_id
        ]
        assert [s.state for s in trajectory.steps] == in_row_order
    assert sorted(plan.row_step.tolist()) == sorted(rows.step_index.tolist())


@pytest.mark.parametrize("identity", ["step_index", "row_keys"])
def test_copied_rows_add_no_step_and_share_the_original_value(identity: str) -> None:
    rows = rollout_rows()
    order = shuffled_with_copies(rows, copies=4)
    trainer_rows = rows.take(order)
    kwargs: dict[str, object] = (
        {"step_index": trainer_rows.step_index} if identity == "step_index"
        else {"row_keys": [ids.tobytes() for ids in trainer_rows.input_ids]}
    )  # fmt: skip
    request, plan = request_rows(trainer_rows, **kwargs)
    assert plan.num_duplicates == 4
    assert sum(len(t.steps) for t in request.trajectories) == rows.num_rows
    response = answer_by_position(request)
    values = advantages_for_rows(response, plan)
    by_original: dict[int, set[float]] = {}
    for r, original in enumerate(order):
        by_original.setdefault(int(original), set()).add(float(values[r]))
    assert all(len(v) == 1 for v in by_original.values())
    if identity == "step_index":  # the step order is also right after shuffling
        for r in range(trainer_rows.num_rows):
            assert values[r] == expected_value(
                request, trainer_rows.traj_uid[r], trainer_rows.step_index[r]
            )
    tokens = token_advantages_for_rows(response, plan, trainer_rows.response_mask)
    np.testing.assert_array_equal(tokens, values[:, None] * trainer_rows.response_mask)


def test_a_copy_that_disagrees_is_an_error() -> None:
    rows = rollout_rows()
    order = np.concatenate([np.arange(rows.num_rows), [2]])
    copied = rows.take(order)
    rewards = copied.rewards.copy()
    rewards[-1] = 7.0
    with pytest.raises(BuildError) as error:
        rows_to_request(
            copied.uid, copied.traj_uid, copied.anchor_obs, rewards, step_index=copied.step_index
        )
    assert error.value.field == f"rewards[{rows.num_rows}]"
    assert "repeats step" in error.value.message


def test_errors_name_the_callers_row() -> None:
    """After copies are dropped, errors still name the row index the caller passed."""
    rows = rollout_rows()
    copied = rows.take(np.concatenate([[0, 0], np.arange(1, rows.num_rows)]))
    states = copied.anchor_obs.copy()
    states[6] = 42
    with pytest.raises(BuildError) as error:
        rows_to_request(
            copied.uid, copied.traj_uid, states, copied.rewards, step_index=copied.step_index
        )
    assert error.value.field == "states[6]"
    with pytest.raises(BuildError, match=r"^rewards: has 3 entries, expected 21"):
        rows_to_request(copied.uid, copied.traj_uid, copied.anchor_obs, [0.0, 1.0, 2.0])
    with pytest.raises(BuildError, match=r"^step_index\[\d+\]: trajectory 'traj-0-3'"):
        steps = copied.step_index.copy()
        steps[np.flatnonzero(copied.traj_uid == "traj-0-3")[-1]] = 9
        rows_to_request(
            copied.uid, copied.traj_uid, copied.anchor_obs, copied.rewards, step_index=steps
        )


def test_zero_length_and_variable_length_responses() -> None:
    rows = rollout_rows()
    empty = np.flatnonzero(rows.response_mask.sum(1) == 0)
    assert empty.size == 1  # the batch has one step with an empty response
    request, plan = request_rows(rows)
    assert sum(len(t.steps) for t in request.trajectories) == rows.num_rows  # it keeps its step
    tokens = token_advantages_for_rows(answer_by_position(request), plan, rows.response_mask)
    assert not tokens[empty].any()
    lengths = (tokens != 0).sum(1)
    np.testing.assert_array_equal(lengths, rows.response_mask.sum(1))


def test_torch_masks_keep_their_container() -> None:
    torch = pytest.importorskip("torch")
    rows = rollout_rows()
    request, plan = request_rows(rows)
    mask = torch.as_tensor(rows.response_mask, dtype=torch.bool)
    tokens = token_advantages_for_rows(answer_by_position(request), plan, mask)
    assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.float32
    values = advantages_for_rows(answer_by_position(request), plan)
    np.testing.assert_allclose(tokens.numpy(), values[:, None] * rows.response_mask, rtol=1e-6)


def test_derive_step_index_before_reordering() -> None:
    rows = rollout_rows()
    np.testing.assert_array_equal(derive_step_index(rows.traj_uid), rows.step_index)
    copied = rows.take(np.concatenate([np.arange(rows.num_rows), [3, 7, 3]]))
    keys = [ids.tobytes() for ids in copied.input_ids]
    np.testing.assert_array_equal(derive_step_index(copied.traj_uid, keys), copied.step_index)
    # without keys a copy looks like one more step
    assert derive_step_index(copied.traj_uid)[-1] != copied.step_index[-1]


def test_real_server_shuffled_and_copied_rows_equal_direct_call(server: object) -> None:
    rows = rollout_rows()
    order = shuffled_with_copies(rows, seed=3, copies=3)
    trainer_rows = rows.take(order)
    with ProxmoClient(server.target) as client:  # type: ignore[attr-defined]
        request, plan = request_rows(trainer_rows, step_index=trainer_rows.step_index)
        got = token_advantages_for_rows(
            client.compute_advantages(request), plan, trainer_rows.response_mask
        )
        direct = client.compute_advantages(rows.trajectories(), preset="paper")
    per_step = {
        (t.trajectory_id, s): a for t in direct.trajectories for s, a in enumerate(t.advantages)
    }
    want = np.array(
        [
            per_step[(trainer_rows.traj_uid[r], int(trainer_rows.step_index[r]))]
            for r in range(trainer_rows.num_rows)
        ]
    )
    assert np.abs(want).max() > 0.1  # a real signal, not all zeros
    np.testing.assert_allclose(
        got, want[:, None] * trainer_rows.response_mask, rtol=1e-12, atol=1e-12
    )
