"""The clients against a real gRPC server on loopback: retries, deadlines, metadata, streams."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from proxmo_client import (
    AsyncProxmoClient,
    BuildError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    HealthStatus,
    InvalidArgumentError,
    ProxmoClient,
    ProxmoError,
    ResourceExhaustedError,
    UnavailableError,
    advantages_to_rows,
    build_request,
    trajectories_from_rows,
)
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from scripted_server import RunningServer, ScriptedServicer

TRAJECTORIES = [
    {"trajectory_id": "a", "group_id": "g", "states": ["s0", "s1"], "rewards": [0.0, 1.0]},
    {"trajectory_id": "b", "group_id": "g", "states": ["s0"], "rewards": [0.5]},
]
FAST_RETRY = {"retry_backoff_s": 0.01, "retry_max_backoff_s": 0.02}


def test_compute_retries_unavailable_with_the_same_request_id(scripted_server: RunningServer):
    scripted_server.servicer.fail_first = 2
    with ProxmoClient(scripted_server.target, max_retries=3, **FAST_RETRY) as client:
        response = client.compute_advantages(TRAJECTORIES, preset="proxmo")
    ids = [c.request_id for c in scripted_server.servicer.calls]
    assert len(ids) == 3
    assert len(set(ids)) == 1
    assert uuid.UUID(ids[0]).version == 4
    assert response.request_id == ids[0]
    assert list(response.trajectories[0].advantages) == [0.0, 11.0]


def test_retries_give_up_after_max_retries(scripted_server: RunningServer):
    scripted_server.servicer.fail_first = 10
    request = build_request(TRAJECTORIES, request_id="fixed-id")
    with ProxmoClient(scripted_server.target, max_retries=2, **FAST_RETRY) as client:
        with pytest.raises(UnavailableError) as info:
            client.compute_advantages(request)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert "scripted: not ready" in info.value.details
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert [c.request_id for c in scripted_server.servicer.calls] == ["fixed-id"] * 3


def test_other_errors_are_not_retried(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    servicer.fail_details = "trajectories[1].steps[0].reward: must be finite"
    with ProxmoClient(scripted_server.target, max_retries=5, **FAST_RETRY) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.compute_advantages(TRAJECTORIES)
    assert len(servicer.calls) == 1
    assert info.value.details == servicer.fail_details
    assert "trajectories[1].steps[0].reward" in str(info.value)


def test_default_deadline_surfaces_as_deadline_exceeded(scripted_server: RunningServer):
    scripted_server.servicer.delay_s = 2.0
    start = time.monotonic()
    with ProxmoClient(scripted_server.target, timeout=0.3) as client:
        with pytest.raises(DeadlineExceededError) as info:
            client.server_info()
    assert time.monotonic() - start < 1.5
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(info.value, ProxmoError)


def test_deadline_bounds_the_retries(scripted_server: RunningServer):
    scripted_server.servicer.fail_first = 1000
    start = time.monotonic()
    with ProxmoClient(
        scripted_server.target, timeout=0.5, max_retries=100, retry_backoff_s=0.05
    ) as client:
        with pytest.raises(UnavailableError):
            client.compute_advantages(TRAJECTORIES)
    assert time.monotonic() - start < 1.5
    calls = scripted_server.servicer.calls
    assert 2 <= len(calls) < 100
    assert len({c.request_id for c in calls}) == 1


def test_token_is_sent_as_bearer_metadata(scripted_server: RunningServer):
    with ProxmoClient(scripted_server.target, token="s3cret") as client:
        client.compute_advantages(TRAJECTORIES)
        client.get_success_rates(["t1"])
    with ProxmoClient(scripted_server.target) as client:
        client.server_info()
    first, second, anonymous = scripted_server.servicer.calls
    assert first.metadata["authorization"] == "Bearer s3cret"
    assert second.metadata["authorization"] == "Bearer s3cret"
    assert "authorization" not in anonymous.metadata
    assert first.metadata["user-agent"].startswith("proxmo-client-python/")


def test_request_id_is_kept_and_the_callers_request_is_not_modified(
    scripted_server: RunningServer,
):
    request = build_request(TRAJECTORIES)
    request.request_id = ""
    with ProxmoClient(scripted_server.target) as client:
        filled = client.compute_advantages(request, dry_run=True)
        explicit = client.compute_advantages(request, request_id="mine")
    assert request.request_id == "" and not request.dry_run
    assert filled.request_id and filled.request_id != "mine"
    assert explicit.request_id == "mine"
    with pytest.raises(BuildError, match="config"):
        ProxmoClient(scripted_server.target).compute_advantages(request, gamma=0.5)


def test_rows_round_trip_through_a_server(scripted_server: RunningServer):
    rng = np.random.default_rng(0)
    traj_of_row = np.repeat(np.arange(6), 4)
    order = rng.permutation(traj_of_row.size)
    traj_ids = [f"t{k}" for k in traj_of_row[order]]
    group_ids = [f"g{k // 3}" for k in traj_of_row[order]]
    rewards = rng.integers(0, 5, size=order.size).astype(float)
    trajectories, rows = trajectories_from_rows(group_ids, traj_ids, ["obs"] * order.size, rewards)
    with ProxmoClient(scripted_server.target) as client:
        response = client.compute_advantages(trajectories, preset="gigpo")
    per_row = advantages_to_rows(response, rows)
    np.testing.assert_array_equal(per_row, rewards * 10 + rows.row_step)


def test_stream_fills_request_ids_and_keeps_order(scripted_server: RunningServer):
    requests = [build_request(TRAJECTORIES, request_id=f"r{i}") for i in range(3)]
    requests.append(build_request(TRAJECTORIES))
    requests[-1].request_id = ""
    with ProxmoClient(scripted_server.target) as client:
        responses = list(client.stream_advantages(iter(requests)))
    assert [r.request_id for r in responses[:3]] == ["r0", "r1", "r2"]
    assert responses[3].request_id
    assert [c.request_id for c in scripted_server.servicer.calls] == [
        r.request_id for r in responses
    ]


def test_stream_errors_surface_as_proxmo_error(scripted_server: RunningServer):
    scripted_server.servicer.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    with ProxmoClient(scripted_server.target) as client:
        with pytest.raises(ResourceExhaustedError) as info:
            list(client.stream_advantages([build_request(TRAJECTORIES)]))
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_health_and_other_rpcs(scripted_server: RunningServer):
    with ProxmoClient(scripted_server.target) as client:
        assert client.health() is HealthStatus.SERVING
        scripted_server.health.set("proxmo.v1.CreditAssignmentService", 2)  # NOT_SERVING
        assert client.health("proxmo.v1.CreditAssignmentService") is HealthStatus.NOT_SERVING
        with pytest.raises(ProxmoError) as info:
            client.health("no.such.Service")
        assert info.value.code is grpc.StatusCode.NOT_FOUND
        assert client.server_info().version == "test-0"
        rates = client.get_success_rates(["x", "y"], prefix="p")
        assert [t.task_id for t in rates.tasks] == ["x", "y"]
        assert client.reset_success_rates(["x"]).deleted == 1
        assert client.reset_success_rates(all_tasks=True).deleted == 7
        with pytest.raises(BuildError, match="task_ids"):
            client.reset_success_rates()
    assert health_pb2.HealthCheckResponse.NOT_SERVING == HealthStatus.NOT_SERVING


def test_unreachable_server_is_unavailable_after_retries():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ProxmoClient(f"127.0.0.1:{port}", max_retries=1, timeout=5, **FAST_RETRY) as client:
        with pytest.raises(UnavailableError):
            client.server_info()


def test_max_message_bytes_is_applied(scripted_server: RunningServer):
    big = [{"trajectory_id": "a", "group_id": "g", "states": ["x" * 5000], "rewards": [0.0]}]
    with ProxmoClient(scripted_server.target, max_message_bytes=1024) as client:
        with pytest.raises(ResourceExhaustedError):
            client.compute_advantages(big)
    assert scripted_server.servicer.calls == []


def test_async_client_retries_with_the_same_request_id(scripted_server: RunningServer):
    scripted_server.servicer.fail_first = 2

    async def scenario() -> tuple[pb.ComputeAdvantagesResponse, list[str]]:
        async with AsyncProxmoClient(
            scripted_server.target, max_retries=3, token="tok", **FAST_RETRY
        ) as client:
            response = await client.compute_advantages(TRAJECTORIES)
            assert await client.health() is HealthStatus.SERVING

            async def requests():
                for i in range(2):
                    yield build_request(TRAJECTORIES, request_id=f"s{i}")

            streamed = [r.request_id async for r in client.stream_advantages(requests())]
            return response, streamed

    response, streamed = asyncio.run(scenario())
    compute_calls = [c for c in scripted_server.servicer.calls if c.method == "ComputeAdvantages"]
    assert len(compute_calls) == 3
    assert {c.request_id for c in compute_calls} == {response.request_id}
    assert all(c.metadata["authorization"] == "Bearer tok" for c in compute_calls)
    assert streamed == ["s0", "s1"]


def test_async_deadline(scripted_server: RunningServer):
    scripted_server.servicer.delay_s = 2.0

    async def scenario() -> None:
        async with AsyncProxmoClient(scripted_server.target, timeout=0.3) as client:
            await client.compute_advantages(TRAJECTORIES)

    with pytest.raises(DeadlineExceededError):
        asyncio.run(scenario())


def test_tls_with_a_self_signed_certificate(tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=proxmo-test", "-addext", "subjectAltName=DNS:proxmo-test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CreditAssignmentServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        with ProxmoClient(
            f"127.0.0.1:{port}",
            root_certificates=cert.read_bytes(),
            tls_server_name="proxmo-test",
            token="t",
        ) as client:
            assert client.server_info().version == "test-0"
        with ProxmoClient(f"127.0.0.1:{port}", max_retries=0, timeout=5) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.server_info()
    finally:
        server.stop(grace=None).wait()
    assert servicer.calls[0].metadata["authorization"] == "Bearer t"


def test_wait_until_serving(scripted_server: RunningServer):
    scripted_server.health.set("", 2)  # NOT_SERVING: warming up
    timer = threading.Timer(0.4, scripted_server.health.set, args=("", 1))
    timer.start()
    start = time.monotonic()
    with ProxmoClient(scripted_server.target) as client:
        client.wait_until_serving(timeout=5, poll_s=0.05)
        assert 0.3 < time.monotonic() - start < 3
        scripted_server.health.set("", 2)
        # Long enough for a health answer on a loaded machine (with 0.3 s the first check
        # itself sometimes ran out of time, and "last" was DEADLINE_EXCEEDED).
        with pytest.raises(DeadlineExceededError, match="last: NOT_SERVING"):
            client.wait_until_serving(timeout=1.5, poll_s=0.05)
    timer.join()

    async def scenario() -> None:
        async with AsyncProxmoClient(scripted_server.target) as client:
            with pytest.raises(DeadlineExceededError):
                await client.wait_until_serving(timeout=0.3, poll_s=0.05)
            scripted_server.health.set("", 1)
            await client.wait_until_serving(timeout=2)

    asyncio.run(scenario())


def test_closing_a_stream_early_cancels_it(scripted_server: RunningServer):
    def endless():
        i = 0
        while True:
            yield build_request(TRAJECTORIES, request_id=f"e{i}")
            i += 1
            time.sleep(0.01)

    with ProxmoClient(scripted_server.target) as client:
        stream = client.stream_advantages(endless())
        assert [next(stream).request_id, next(stream).request_id] == ["e0", "e1"]
        stream.close()
        seen = len(scripted_server.servicer.calls)
        time.sleep(0.3)
    assert len(scripted_server.servicer.calls) <= seen + 2  # the server stopped reading


# ---- PrefetchStates


def test_prefetch_states_sends_the_texts_and_returns_the_answer(scripted_server: RunningServer):
    with ProxmoClient(scripted_server.target, token="tok") as client:
        queued = client.prefetch_states(s for s in ["s0", "s1", "s0"])  # any iterable
        waited = client.prefetch_states(["s2"], wait=True)
    assert (queued.distinct_states, queued.queued_states, queued.cached_states) == (2, 2, 0)
    assert (waited.distinct_states, waited.queued_states, waited.cached_states) == (1, 0, 1)
    first, second = scripted_server.servicer.calls
    assert first.method == second.method == "PrefetchStates"
    assert list(first.request.states) == ["s0", "s1", "s0"] and not first.request.wait
    assert list(second.request.states) == ["s2"] and second.request.wait
    assert first.metadata["authorization"] == "Bearer tok"


def test_prefetch_states_rejects_bad_input_before_sending(scripted_server: RunningServer):
    with ProxmoClient(scripted_server.target) as client:
        with pytest.raises(BuildError) as info:
            client.prefetch_states(["ok", "fine", b"bytes"])  # type: ignore[list-item]
        assert info.value.field == "states[2]"
        assert str(info.value) == "states[2]: expected a string, got bytes"
        with pytest.raises(BuildError) as info:
            client.prefetch_states("one text")
        assert info.value.field == "states"
        with pytest.raises(BuildError) as info:
            client.prefetch_states(["a"], wait="yes")  # type: ignore[arg-type]
        assert info.value.field == "wait"
    assert scripted_server.servicer.calls == []


def test_prefetch_states_errors_are_raised_not_swallowed(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_with = grpc.StatusCode.FAILED_PRECONDITION
    servicer.fail_details = "states: this server runs without an encoder"
    with ProxmoClient(scripted_server.target, max_retries=5, **FAST_RETRY) as client:
        with pytest.raises(FailedPreconditionError) as info:
            client.prefetch_states(["s0"])
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.method == "PrefetchStates"
    assert len(servicer.calls) == 1  # not retried


# ---- CANCELLED from the server (a terminating replica) is retried like UNAVAILABLE


def test_server_cancelled_is_retried_with_the_same_request_id(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_first, servicer.fail_first_code = 2, grpc.StatusCode.CANCELLED
    with ProxmoClient(scripted_server.target, max_retries=2, **FAST_RETRY) as client:
        response = client.compute_advantages(TRAJECTORIES)
    ids = [c.request_id for c in servicer.calls]
    assert len(ids) == 3 and len(set(ids)) == 1
    assert response.request_id == ids[0]
    assert list(response.trajectories[0].advantages) == [0.0, 11.0]


def test_server_cancelled_is_not_retried_past_max_retries(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_first, servicer.fail_first_code = 10, grpc.StatusCode.CANCELLED
    request = build_request(TRAJECTORIES, request_id="fixed-id")
    with ProxmoClient(scripted_server.target, max_retries=2, **FAST_RETRY) as client:
        with pytest.raises(CancelledError) as info:
            client.compute_advantages(request)
    assert info.value.code is grpc.StatusCode.CANCELLED
    assert info.value.details == "scripted: CANCELLED"
    assert [c.request_id for c in servicer.calls] == ["fixed-id"] * 3


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("PrefetchStates", lambda c: c.prefetch_states(["s0"])),
        ("GetSuccessRates", lambda c: c.get_success_rates(["t"])),
        ("ResetSuccessRates", lambda c: c.reset_success_rates(["t"])),
        ("GetServerInfo", lambda c: c.server_info()),
    ],
)
@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
def test_every_unary_rpc_is_retried(scripted_server: RunningServer, method, call, code):
    servicer = scripted_server.servicer
    servicer.fail_first, servicer.fail_first_code = 1, code
    with ProxmoClient(scripted_server.target, max_retries=1, **FAST_RETRY) as client:
        call(client)
    assert [c.method for c in servicer.calls] == [method, method]


def test_a_call_cut_by_close_is_not_retried(scripted_server: RunningServer):
    """close() from another thread cancels a running call locally (CANCELLED): it surfaces as
    CancelledError, no retry on the closed channel."""
    servicer = scripted_server.servicer
    servicer.delay_s = 1.0
    client = ProxmoClient(scripted_server.target, max_retries=5, **FAST_RETRY)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.compute_advantages(TRAJECTORIES)
        except BaseException as error:  # noqa: BLE001 (recorded for the assertions)
            outcome.append(error)

    worker = threading.Thread(target=call)
    worker.start()
    _wait_for_calls(servicer, 1)
    client.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CancelledError), outcome
    assert len(servicer.calls) == 1


def test_async_client_retries_server_cancelled(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_first, servicer.fail_first_code = 2, grpc.StatusCode.CANCELLED

    async def scenario() -> tuple[pb.ComputeAdvantagesResponse, pb.PrefetchStatesResponse]:
        async with AsyncProxmoClient(scripted_server.target, max_retries=2, **FAST_RETRY) as client:
            response = await client.compute_advantages(TRAJECTORIES)
            prefetched = await client.prefetch_states(["s0", "s1"], wait=True)
            return response, prefetched

    response, prefetched = asyncio.run(scenario())
    compute = [c for c in servicer.calls if c.method == "ComputeAdvantages"]
    assert len(compute) == 3 and {c.request_id for c in compute} == {response.request_id}
    assert (prefetched.distinct_states, prefetched.cached_states) == (2, 2)
    assert list(servicer.calls[-1].request.states) == ["s0", "s1"]


def test_async_client_gives_up_on_cancelled_after_max_retries(scripted_server: RunningServer):
    servicer = scripted_server.servicer
    servicer.fail_first, servicer.fail_first_code = 10, grpc.StatusCode.CANCELLED

    async def scenario() -> None:
        async with AsyncProxmoClient(scripted_server.target, max_retries=1, **FAST_RETRY) as client:
            await client.compute_advantages(build_request(TRAJECTORIES, request_id="fixed-id"))

    with pytest.raises(CancelledError) as info:
        asyncio.run(scenario())
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert [c.request_id for c in servicer.calls] == ["fixed-id"] * 2


def test_async_local_cancellation_is_not_retried(scripted_server: RunningServer):
    """Cancelling the caller's task raises asyncio.CancelledError at once, in flight or in the
    back-off, and sends nothing more."""
    servicer = scripted_server.servicer

    async def cancel_after_first_call(client: AsyncProxmoClient) -> None:
        task = asyncio.create_task(client.compute_advantages(TRAJECTORIES))
        while not servicer.calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=2)
        await asyncio.sleep(0.6)  # longer than a back-off: a retry would have arrived

    async def scenario() -> None:
        async with AsyncProxmoClient(
            scripted_server.target, max_retries=5, retry_backoff_s=0.4, retry_max_backoff_s=0.4
        ) as client:
            servicer.delay_s = 1.0  # in flight
            await cancel_after_first_call(client)
            assert len(servicer.calls) == 1
            servicer.calls.clear()
            servicer.delay_s, servicer.fail_first = 0.0, 1000  # in the back-off
            await cancel_after_first_call(client)
            assert len(servicer.calls) == 1

    asyncio.run(scenario())


def _wait_for_calls(servicer: ScriptedServicer, n: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while len(servicer.calls) < n:
        assert time.monotonic() < end, f"the server saw {len(servicer.calls)} calls, not {n}"
        time.sleep(0.01)
