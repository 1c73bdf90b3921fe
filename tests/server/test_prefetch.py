"""PrefetchStates through a real server: states sent ahead of their batch are embedded in the
background, so the batch's ComputeAdvantages encodes nothing; errors name the field."""

from __future__ import annotations

import grpc
import httpx
import pytest
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, StartServer, make_request, unique


def test_prefetched_states_make_the_batch_encode_nothing(start_server: StartServer) -> None:
    server = start_server("--encoder-threads", "1", encoder=True)
    request = make_request(request_id=unique("pre"), task_prefix=unique("pre"), steps=5,
                           similarity=pb.SIMILARITY_ENCODER, dry_run=True)
    # As a rollout loop sends them: each trajectory's states when it finishes.
    *first, last = request.trajectories
    for trajectory in first:
        answer = server.stub.PrefetchStates(
            pb.PrefetchStatesRequest(states=[s.state for s in trajectory.steps]), timeout=30)
        assert answer.distinct_states == len({s.state for s in trajectory.steps})
        assert answer.dropped_states == 0
    # The REST door, waiting until its own texts are embedded.
    body = {"states": [s.state for s in last.steps], "wait": True}
    rest = httpx.post(f"{server.http_url}/v1/prefetch", json=body, timeout=60)
    assert rest.status_code == 200, rest.text
    assert rest.json()["distinctStates"] == len({s.state for s in last.steps})
    every = sorted({s.state for t in request.trajectories for s in t.steps})
    waited = server.stub.PrefetchStates(pb.PrefetchStatesRequest(states=every, wait=True),
                                        timeout=60)
    assert waited.cached_states + waited.queued_states == len(every)
    assert waited.cached_states >= len({s.state for s in last.steps})
    done = server.stub.PrefetchStates(pb.PrefetchStatesRequest(states=every), timeout=10)
    assert done.cached_states == len(every) and done.queued_states == 0

    response = server.stub.ComputeAdvantages(request, timeout=60)
    assert response.timing.num_unique_states == len(every)
    assert response.timing.num_encoded_states == 0
    assert response.resolved_config.similarity == pb.SIMILARITY_ENCODER
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    assert 'proxmo_encoder_prefetch_texts_total{outcome="cached"}' in metrics
    assert 'proxmo_requests_total{code="OK",rpc="PrefetchStates",transport="grpc"}' in metrics


def test_prefetch_without_an_encoder_is_a_failed_precondition(server: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.PrefetchStates(pb.PrefetchStatesRequest(states=["a"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "states" in (caught.value.details() or "")
    rest = httpx.post(f"{server.http_url}/v1/prefetch", json={"states": ["a"]}, timeout=10)
    assert rest.status_code == 400 and rest.json()["error"]["field"] == "states"


def test_prefetch_limits_and_bad_bodies_name_the_field(start_server: StartServer) -> None:
    server = start_server("--max-state-chars", "100", "--max-total-steps", "10")
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.PrefetchStates(pb.PrefetchStatesRequest(states=["ok", "x" * 101]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "states[1]" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.PrefetchStates(pb.PrefetchStatesRequest(states=["s"] * 11), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for body, field in ((b'{"states": "not a list"}', "body"), (b"[1, 2]", "body"),
                        (b'{"states": ["x"], "wait": "soon"}', "body")):
        rest = httpx.post(f"{server.http_url}/v1/prefetch", content=body, timeout=10)
        assert rest.status_code == 422, (body, rest.text)
        assert rest.json()["error"]["field"] == field
