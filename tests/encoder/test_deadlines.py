"""A batch too big for the client's default deadline, against a real server with the torch-cpu
encoder (issue 21): the server answers a call it cannot finish just before the deadline, saying
how far the encoding got and what fixes it, and keeps the work; the default client sizes its
deadline from the server's measured encoder rate, so its first call of a big batch succeeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from proxmo_client import ProxmoClient
from proxmo_client.deadline import MIN_STATES, encoder_deadline_s
from proxmo_client.errors import DeadlineExceededError
from proxmo_client.v1 import proxmo_pb2 as pb

from .alfworld_states import alfworld_groups
from .test_server_encoder import Server

SHORT_S = 3.0  # the client's default deadline here; the batch needs several times that


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with Server(tmp_path / "server.log", "--similarity", "encoder") as running:
        running.wait_ready(timeout=180)
        yield running


def big_batch(nonce: str) -> list[dict[str, object]]:
    """ALFWorld-like groups with at least MIN_STATES distinct states."""
    trajectories: list[dict[str, object]] = []
    for g, group in enumerate(alfworld_groups(18, 8, 20, seed=31)):
        for k, states in enumerate(group):
            trajectories.append({
                "trajectory_id": f"g{g}t{k}", "group_id": f"g{g}", "task_id": f"task-{g}",
                "states": [f"{state} ({nonce} {g})" for state in states],
                "rewards": [0.0] * (len(states) - 1) + [float(k % 2)],
            })
    return trajectories


@pytest.mark.slow
def test_a_big_cold_batch_is_explained_then_succeeds_through_the_default_client(
    server: Server, nonce: str
) -> None:
    trajectories = big_batch(nonce)
    distinct = len({s for t in trajectories for s in t["states"]})  # type: ignore[attr-defined]
    assert distinct >= MIN_STATES
    encoded_before = server.metric("proxmo_encoder_texts_encoded_total")
    with ProxmoClient(server.grpc_target, timeout=SHORT_S) as client:
        # An explicit short deadline: the server explains before the client gives up.
        with pytest.raises(DeadlineExceededError) as raised:
            client.compute_advantages(trajectories, dry_run=True, request_id="big-1",
                                      timeout=SHORT_S)
        message = str(raised.value)
        assert f"of {distinct} new distinct states encoded" in message, message
        assert "continue in the background" in message and "PrefetchStates" in message

        # The default deadline: sized from the batch and the server's measured rate.
        info = client.server_info()
        assert info.encoder.states_per_second > 0
        request = pb.ComputeAdvantagesRequest()
        for t in trajectories:
            steps = [pb.Step(state=s) for s in t["states"]]  # type: ignore[attr-defined]
            request.trajectories.add(steps=steps)
        assert encoder_deadline_s(request, info, SHORT_S) > 2 * SHORT_S
        response = client.compute_advantages(trajectories, dry_run=True, request_id="big-2")
    assert response.timing.num_unique_states == distinct
    # The first call's work was kept: this one encoded only what was left, and no state
    # went through the model twice.
    assert response.timing.num_encoded_states < distinct
    assert server.metric("proxmo_encoder_texts_encoded_total") - encoded_before == distinct


def test_the_default_deadline_grows_with_the_distinct_states_of_encoder_batches() -> None:
    info = pb.GetServerInfoResponse(
        default_preset="proxmo", default_similarity=pb.SIMILARITY_ENCODER,
        presets=[pb.Preset(name="proxmo",
                           config=pb.EstimatorConfig(similarity=pb.SIMILARITY_ENCODER)),
                 pb.Preset(name="grpo", config=pb.EstimatorConfig())],
        encoder=pb.EncoderInfo(backend="torch-cpu", states_per_second=200.0),
    )

    def request(distinct: int, **config: object) -> pb.ComputeAdvantagesRequest:
        out = pb.ComputeAdvantagesRequest(config=pb.EstimatorConfig(**config))  # type: ignore[arg-type]
        out.trajectories.add(steps=[pb.Step(state=f"s{i % distinct}") for i in range(2 * distinct)])
        return out

    assert encoder_deadline_s(request(2000), info, 30.0) == 30.0 + 2.0 * 2000 / 200.0
    assert encoder_deadline_s(request(2000, preset="proxmo"), info, 30.0) == 50.0
    assert encoder_deadline_s(request(2000, similarity=pb.SIMILARITY_TFIDF), info, 30.0) == 30.0
    assert encoder_deadline_s(request(2000, preset="grpo"), info, 30.0) == 30.0
    assert encoder_deadline_s(request(2000), None, 30.0) == 30.0
    no_rate = pb.GetServerInfoResponse()
    no_rate.CopyFrom(info)
    no_rate.encoder.states_per_second = 0.0
    assert encoder_deadline_s(request(2000), no_rate, 30.0) == 30.0
