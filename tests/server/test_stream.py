"""StreamAdvantages: answers in request order, errors name requests[k], work stops on cancel."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import pytest
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, make_request, response_dict, unique


def test_answers_come_back_in_request_order(server: ServerProcess) -> None:
    # Big requests first, small ones after: computed concurrently, the small ones finish first.
    sizes = [64, 32, 1, 16, 1, 2, 1, 8]
    requests = [make_request(groups=g, request_id=f"{unique('order')}-{i}", dry_run=True)
                for i, g in enumerate(sizes)]
    answers = list(server.stub.StreamAdvantages(iter(requests), timeout=120))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    assert [len(a.groups) for a in answers] == sizes
    # The same numbers as the unary RPC.
    assert response_dict(answers[3]) == response_dict(
        server.stub.ComputeAdvantages(requests[3], timeout=30))


def test_an_invalid_request_ends_the_stream_after_the_answers_before_it(
    server: ServerProcess,
) -> None:
    requests = [make_request(request_id=f"{unique('inv')}-{i}", dry_run=True) for i in range(4)]
    requests[2].trajectories[1].steps[0].reward = math.inf
    received: list[str] = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in server.stub.StreamAdvantages(iter(requests), timeout=60):
            received.append(answer.request_id)
    assert received == [requests[0].request_id, requests[1].request_id]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "requests[2].trajectories[1].steps[0].reward: must be finite, got inf")


def test_cancelling_the_stream_stops_the_work(server: ServerProcess) -> None:
    prefix = unique("cancel")
    n_requests = 40

    def requests() -> Iterator[pb.ComputeAdvantagesRequest]:
        for i in range(n_requests):
            yield make_request(groups=64, per_group=8, steps=50, request_id=f"{prefix}-{i}",
                               task_prefix=f"{prefix}-{i}")

    rows_before = server.metric("proxmo_rows_processed_total")
    call = server.stub.StreamAdvantages(requests(), timeout=120)
    first = next(call)
    assert first.request_id == f"{prefix}-0"
    call.cancel()
    # In-flight work is cancelled and no more requests are taken.
    deadline = time.monotonic() + 20
    while server.metric("proxmo_inflight_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("proxmo_inflight_requests") == 0
    time.sleep(1.0)
    rows = server.metric("proxmo_rows_processed_total") - rows_before
    per_request = 64 * 8 * 50
    # At most the first answer plus the ones in flight (stream_inflight 4) were computed.
    assert rows <= per_request * 6, rows / per_request
    stored = server.stub.GetSuccessRates(
        pb.GetSuccessRatesRequest(prefix=prefix, page_size=1000), timeout=5)
    assert len({t.task_id.rsplit("-", 1)[0] for t in stored.tasks}) <= 6
    # The server is healthy and serving.
    assert server.stub.ComputeAdvantages(make_request(dry_run=True), timeout=30).trajectories
