"""Admission control and deadlines under real load (large real requests, a tiny limit)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from google.protobuf import json_format
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, make_request, unique

# ~100k step rows: long enough (hundreds of ms on one compute thread) to hold the only slot.
BIG = {"groups": 256, "per_group": 8, "steps": 50}


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise TimeoutError("condition not reached")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--max-concurrency", "1"], tmp_path_factory.mktemp("tiny") / "log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_beyond_the_limit_unary_calls_are_refused_at_once(tiny: ServerProcess) -> None:
    holder = tiny.stub.ComputeAdvantages.future(
        make_request(**BIG, task_prefix=unique("hold")), timeout=120)
    _wait_for(lambda: tiny.metric("proxmo_inflight_requests") == 1)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        tiny.stub.ComputeAdvantages(make_request(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "server is at its concurrency limit (1)"
    assert time.monotonic() - started < 1.0  # refused, not queued

    rest = httpx.post(f"{tiny.http_url}/v1/advantages",
                      content=json_format.MessageToJson(make_request()), timeout=30)
    assert rest.status_code == 429
    assert rest.json()["error"]["code"] == "RESOURCE_EXHAUSTED"

    # Reads do not compute and are not limited.
    tiny.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert httpx.get(f"{tiny.http_url}/readyz", timeout=5).status_code == 200

    assert len(holder.result().trajectories) == 256 * 8
    assert tiny.metric("proxmo_rejected_total", reason="overloaded") >= 2
    # Once the slot is free, the next call is served.
    assert len(tiny.stub.ComputeAdvantages(make_request(), timeout=30).trajectories) == 8


def test_streams_are_slowed_not_refused(tiny: ServerProcess) -> None:
    holder = tiny.stub.ComputeAdvantages.future(
        make_request(**BIG, task_prefix=unique("hold")), timeout=120)
    _wait_for(lambda: tiny.metric("proxmo_inflight_requests") == 1)
    requests = [make_request(request_id=f"s{i}", dry_run=True) for i in range(3)]
    answers = list(tiny.stub.StreamAdvantages(iter(requests), timeout=120))
    assert [a.request_id for a in answers] == ["s0", "s1", "s2"]
    assert holder.done()  # the stream waited for the slot the unary call held
    # Queue time shows the wait for admission.
    assert answers[0].timing.queue_ns > 0


def test_concurrent_burst_gets_ok_or_resource_exhausted(tiny: ServerProcess) -> None:
    futures = [tiny.stub.ComputeAdvantages.future(
        make_request(groups=64, per_group=8, steps=50, dry_run=True), timeout=120)
        for _ in range(6)]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes


def test_deadline_exceeded_and_no_work_after_it(server: ServerProcess) -> None:
    prefix = unique("late")
    request = make_request(**BIG, task_prefix=prefix, request_id=prefix)
    rows_before = server.metric("proxmo_rows_processed_total")
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ComputeAdvantages(request, timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server stopped at a stage boundary: the success-rate store was never written.
    _wait_for(lambda: server.metric("proxmo_inflight_requests") == 0)
    time.sleep(0.5)
    left = server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(prefix=prefix), timeout=5)
    assert list(left.tasks) == []
    # Whether the call expired in transit or mid-computation, no batch was completed.
    assert server.metric("proxmo_rows_processed_total") == rows_before
    # The server is fine afterwards.
    assert server.stub.ComputeAdvantages(make_request(dry_run=True), timeout=30).trajectories


def test_the_limit_is_reported(tiny: ServerProcess) -> None:
    info = tiny.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.limits.max_concurrency == 1
