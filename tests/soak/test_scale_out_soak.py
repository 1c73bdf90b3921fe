"""The long scale-out runs of ``make soak`` (collected only with ``PROXMO_SOAK=1``): three
replicas with the encoder and the shared Redis embedding cache, and a Sentinel failover under
load through two servers (primary SIGKILLed, a replica promoted by real sentinels) with no
failed RPC and, with ``--redis-wait-replicas 1``, exact totals. The fast slices are in
tests/server/test_scale_out.py and tests/store/test_store_sentinel.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from server.conftest import StartServer, make_request
from server.test_scale_out import LIGHT, SHARED_REDIS_URL, check_replicas_agree
from support.redis_server import delete_namespace
from support.redis_topology import LocalSentinel

HISTORY = {"success_rate_source": pb.SUCCESS_RATE_SOURCE_HISTORY}


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"replicas-{uuid.uuid4().hex[:10]}"
    yield name
    delete_namespace(SHARED_REDIS_URL, name)


def test_three_replicas_with_the_shared_encoder_cache_agree(start_server: StartServer,
                                                            namespace: str) -> None:
    check_replicas_agree(start_server, namespace, encoder=True)


def test_sentinel_failover_under_load_fails_no_rpc(start_server: StartServer,
                                                    tmp_path: Path) -> None:
    """Trainers keep calling two replicas while the Redis primary is SIGKILLed and the sentinels
    promote a replica: every RPC answers OK (degraded ones use BATCH rates) and, with
    ``--redis-wait-replicas 1``, the stored totals are exactly what was sent."""
    sentinel = LocalSentinel(tmp_path / "sentinel", replicas=2)
    sentinel.start()
    try:
        namespace = "failover"
        args = ("--redis-sentinels", sentinel.sentinels, "--redis-sentinel-master",
                sentinel.name, "--redis-wait-replicas", "1", "--namespace", namespace, *LIGHT)
        replicas = [start_server(*args, wait=False), start_server(*args, wait=False)]
        for replica in replicas:
            replica.wait_ready()
        failures: list[str] = []
        sent = 0

        async def trainer(t: int, stop: asyncio.Event) -> None:
            nonlocal sent
            async with grpc.aio.insecure_channel(replicas[t % 2].grpc_target) as channel:
                stub = pb_grpc.CreditAssignmentServiceStub(channel)
                n = 0
                while not stop.is_set():
                    n += 1
                    request = make_request(groups=2, request_id=f"t{t}-{n}", task_prefix="fo",
                                           **HISTORY)
                    try:
                        await stub.ComputeAdvantages(request, timeout=30)
                        sent += 1
                    except grpc.aio.AioRpcError as error:
                        failures.append(error.code().name)
                    await asyncio.sleep(0.01)

        async def run() -> None:
            stop = asyncio.Event()
            trainers = [asyncio.create_task(trainer(t, stop)) for t in range(4)]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(sentinel.kill_primary_and_wait_for_failover)
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*trainers)

        asyncio.run(run())
        assert failures == []
        for replica in replicas:  # the buffers drain into the new primary
            for _ in range(100):
                if replica.metric("proxmo_store_buffered_updates") == 0:
                    break
                asyncio.run(asyncio.sleep(0.1))
            assert replica.metric("proxmo_store_buffered_updates") == 0
            assert replica.metric("proxmo_store_buffer_dropped_total") == 0
        primary = redis.Redis(port=sentinel.current_primary(), decode_responses=True)
        try:
            totals = [int(primary.hget(f"{namespace}:task:fo-{g}", "total_trials") or 0)
                      for g in range(2)]
        finally:
            primary.close()
        assert totals == [4 * sent, 4 * sent]
    finally:
        sentinel.stop()
