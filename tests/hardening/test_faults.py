"""Faults under load, end to end through real processes and sockets:

- SIGTERM under load loses no accepted request: every call either completed OK or was refused
  with UNAVAILABLE before any work, and the Redis totals equal exactly the OK'd batches;
- Redis SIGKILLed and restarted under load: zero errors, and after recovery the stored totals
  equal exactly the batches that got OK answers (the store's buffer and replay, end to end);
- a client that leaves in the middle of a stream frees its work: the in-flight gauge returns
  to 0 and nothing holds the next drain.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import grpc.aio
import httpx
import pytest
import redis
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

from hardening.conftest import (
    SHARED_REDIS_URL,
    RedisServer,
    ServerProcess,
    StartServer,
    assert_replayed_exactly,
    delete_namespace,
    task_totals,
)

GROUPS, PER_GROUP, STEPS = 4, 4, 6
TASKS = [f"task-{g}" for g in range(GROUPS)]


def history_batch(request_id: str) -> pb.ComputeAdvantagesRequest:
    """A batch that updates the history of every task in TASKS by PER_GROUP trials."""
    request = pb.ComputeAdvantagesRequest(
        request_id=request_id,
        config=pb.EstimatorConfig(success_rate_source=pb.SUCCESS_RATE_SOURCE_HISTORY))
    for g in range(GROUPS):
        for k in range(PER_GROUP):
            trajectory = request.trajectories.add(trajectory_id=f"t{g}-{k}", group_id=f"g{g}",
                                                  task_id=TASKS[g])
            for t in range(STEPS):
                trajectory.steps.add(state=f"room {g} step {t} item {(k * t) % 3}",
                                     reward=float(t == STEPS - 1 and k % 2 == 0))
    return request


Outcome = tuple[str, pb.ComputeAdvantagesResponse | None]


async def hammer(target: str, clients: int, keep_going: Callable[[list[Outcome]], bool],
                 prefix: str) -> list[Outcome]:
    """``clients`` concurrent clients sending fresh batches while ``keep_going(outcomes)``;
    a client stops at its first UNAVAILABLE (the server is going away)."""
    outcomes: list[Outcome] = []

    async def client(c: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CreditAssignmentServiceStub(channel)
            n = 0
            while keep_going(outcomes):
                n += 1
                try:
                    response = await stub.ComputeAdvantages(
                        history_batch(f"{prefix}-{c}-{n}"), timeout=30)
                except grpc.aio.AioRpcError as error:
                    outcomes.append((error.code().name, None))
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return
                    continue
                outcomes.append(("OK", response))
                await asyncio.sleep(0.005)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return outcomes


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"hardening-{uuid.uuid4().hex[:10]}"
    yield name
    delete_namespace(SHARED_REDIS_URL, name)


def _server_ok_count(server: ServerProcess) -> int:
    """ComputeAdvantages answered OK, per the server's own JSON request log."""
    count = 0
    for line in server.logs().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            count += entry.get("rpc") == "ComputeAdvantages" and entry.get("code") == "OK"
    return count


def test_sigterm_under_load_loses_no_accepted_request(start_server: StartServer,
                                                      namespace: str) -> None:
    server = start_server("--redis-url", SHARED_REDIS_URL, "--namespace", namespace,
                          "--log-format", "json", "--grace-period-s", "20")
    sent_sigterm = False

    def keep_going(outcomes: list[Outcome]) -> bool:
        nonlocal sent_sigterm
        if not sent_sigterm and len(outcomes) >= 40:
            server.signal(signal.SIGTERM)  # from inside the load: calls are in flight
            sent_sigterm = True
        return True  # each client stops at its first UNAVAILABLE

    outcomes = asyncio.run(hammer(server.grpc_target, 12, keep_going, f"{namespace}-sig"))
    assert server.proc.wait(timeout=60) == 0
    codes = Counter(code for code, _ in outcomes)
    # A call that reaches the socket in the last instant, while grpc's own stop() runs after the
    # drain, can come back CANCELLED (seen once in CI-like runs). The guarantee is about accepted
    # work: the server's OK count and the store totals below prove that no cancelled call was
    # applied and no computed answer was lost.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert codes["OK"] >= 40 and codes["UNAVAILABLE"] == 12, codes
    # Every answer the server computed reached its client, and nothing refused was applied:
    # the stored totals are exactly the OK'd batches.
    assert _server_ok_count(server) == codes["OK"]
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        assert task_totals(client, namespace, TASKS) == {t: PER_GROUP * codes["OK"]
                                                          for t in TASKS}
    finally:
        client.close()
    assert "grace period over" not in server.logs()


def test_redis_killed_and_restarted_under_load(start_server: StartServer,
                                               redis_server: RedisServer) -> None:
    namespace = "hardening-faults"
    server = start_server("--redis-url", redis_server.url, "--namespace", namespace)
    started = time.monotonic()
    phases: dict[str, float] = {}

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        redis_server.kill()
        phases["killed"] = time.monotonic() - started
        await asyncio.sleep(1.5)  # longer than the store's circuit cool-down (1 s)
        await asyncio.to_thread(redis_server.start)
        phases["restarted"] = time.monotonic() - started

    async def body() -> list[Outcome]:
        load = asyncio.create_task(hammer(
            server.grpc_target, 8, lambda _: time.monotonic() - started < 4.5, "redis-fault"))
        await chaos()
        return await load

    outcomes = asyncio.run(body())
    codes = Counter(code for code, _ in outcomes)
    assert set(codes) == {"OK"}, codes  # fail-open: Redis down never fails a request
    fallbacks = sum(any(g.success_rate_fallback for g in r.groups)
                    for _, r in outcomes if r is not None)
    assert 0 < fallbacks < len(outcomes), (fallbacks, len(outcomes), phases)

    # The buffered updates reach Redis once it is back: the totals become exactly the OK'd
    # batches, none lost, none counted twice.
    assert_replayed_exactly(server, redis_server, namespace, TASKS, PER_GROUP * codes["OK"],
                            timeout=15)
    ready = httpx.get(f"{server.http_url}/readyz?verbose", timeout=5).json()
    assert next(c for c in ready["checks"] if c["name"] == "store")["status"] == "ok"


def test_client_leaving_mid_stream_frees_its_work(start_server: StartServer) -> None:
    server = start_server("--stream-inflight", "4", "--log-format", "json",
                          "--grace-period-s", "30")
    heavy = pb.ComputeAdvantagesRequest(dry_run=True)
    for g in range(48):
        for k in range(8):
            trajectory = heavy.trajectories.add(trajectory_id=f"t{g}-{k}", group_id=f"g{g}")
            for t in range(12):
                trajectory.steps.add(state=f"state {g} {k % 3} {t}", reward=float(t == 11))

    with grpc.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.CreditAssignmentServiceStub(channel).StreamAdvantages(
            iter([heavy] * 32), timeout=120)
        first = next(call)
        assert len(first.trajectories) == len(heavy.trajectories)
        assert server.metric("proxmo_inflight_requests") > 0  # the stream's next requests
        call.cancel()  # the client leaves with requests in flight and unsent

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("proxmo_inflight_requests") > 0:
        time.sleep(0.05)
    assert server.metric("proxmo_inflight_requests") == 0
    rows = server.metric("proxmo_rows_processed_total")
    time.sleep(0.5)
    assert server.metric("proxmo_rows_processed_total") == rows  # nothing still being scored
    assert httpx.get(f"{server.http_url}/readyz", timeout=5).status_code == 200

    # No task of the stream lingers: a drain finds nothing to wait for and exits at once,
    # far inside the 30 s grace period.
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 10
    logs = server.logs()
    assert "grace period over" not in logs
    assert '"code":"CANCELLED"' in logs
