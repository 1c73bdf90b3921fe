"""The store's bounds (issue: one request must never take the store down for others): a script's
deadline scales with its work, one request's own failure never opens the circuit, and a cap on
stored tasks refuses new tasks whole (never a lost or double-counted update)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from prometheus_client import CollectorRegistry
from proxmo.store import MemoryStore, RedisStore, StoreFull, SuccessRateStore, TaskUpdate
from store.conftest import StoreFactory
from support.redis_server import RedisServer


def test_a_big_request_gets_a_deadline_scaled_to_its_work(redis_server: RedisServer) -> None:
    """1,024 tasks with 1 KB ids (a 2 MB script call) on a 50 ms base timeout: the call's deadline
    grows with its tasks and bytes (~0.9 s here), so it is applied, and the store stays up."""
    updates = [TaskUpdate(f"{i:05d}" + "x" * 1019, 1, 2) for i in range(1024)]

    async def body() -> None:
        store = RedisStore(redis_server.url, namespace="bounds", timeout_s=0.05)
        try:
            # Connected first: the connect timeout is the base timeout, whatever the work.
            await store.apply("small", [TaskUpdate("small", 1, 2)], half_life=8, prior=0,
                              dry_run=False)
            started = time.perf_counter()
            result = await store.apply("big", updates, half_life=8, prior=0, dry_run=False)
            took = time.perf_counter() - started
            assert not result.degraded, f"timed out after {took:.3f} s"
            assert took > 0.05  # the fixed base alone would have cut it off
            assert (await store.health()).ok
        finally:
            await store.close()

    asyncio.run(body())


def test_one_requests_refusal_never_marks_the_store_down(redis_server: RedisServer) -> None:
    """A request whose script Redis refuses (a task key of the wrong type) is that request's
    problem: answered degraded, counted as dropped and logged, never buffered to fail again; the
    next request of another trainer is served from the store as usual."""
    client = redis_server.client()
    client.set("bounds:task:poisoned", "not a hash")
    client.close()
    registry = CollectorRegistry()

    async def body() -> None:
        store = RedisStore(redis_server.url, namespace="bounds", registry=registry)
        try:
            bad = await store.apply("bad", [TaskUpdate("poisoned", 1, 2), TaskUpdate("ok", 1, 2)],
                                    half_life=8, prior=0, dry_run=False)
            assert bad.degraded
            assert store.buffered_updates == 0
            good = await store.apply("good", [TaskUpdate("other", 1, 2)], half_life=8, prior=0,
                                     dry_run=False)
            assert not good.degraded and good.rates == {"other": 0.5}
            assert (await store.health()).ok
        finally:
            await store.close()

    asyncio.run(body())
    assert registry.get_sample_value("proxmo_store_buffer_dropped_total") == 1
    assert registry.get_sample_value("proxmo_store_up") == 1


@pytest.mark.parametrize("store_kind", ["memory", "redis"], indirect=True)
def test_the_task_cap_refuses_new_tasks_whole(make_store: StoreFactory) -> None:
    async def body() -> None:
        store: SuccessRateStore = make_store(max_tasks=3)
        try:
            await store.apply("a", [TaskUpdate("t1", 1, 2), TaskUpdate("t2", 1, 2)],
                              half_life=8, prior=0, dry_run=False)
            with pytest.raises(StoreFull) as full:
                await store.apply("b", [TaskUpdate("t1", 1, 2), TaskUpdate("t3", 1, 2),
                                        TaskUpdate("t4", 1, 2)], half_life=8, prior=0,
                                  dry_run=False)
            assert full.value.field == "task_id" and full.value.grpc_code == "RESOURCE_EXHAUSTED"
            assert "store_max_tasks" in full.value.message
            # Nothing of the refused request was stored, and its id was not claimed.
            assert [(r.task_id, r.updates) for r in await store.get(["t1", "t3", "t4"])] == [
                ("t1", 1)]
            retry = await store.apply("b", [TaskUpdate("t1", 1, 2), TaskUpdate("t3", 1, 2)],
                                      half_life=8, prior=0, dry_run=False)
            assert not retry.replayed and set(retry.rates) == {"t1", "t3"}
            # Stored tasks always take updates; a reset makes room again.
            await store.apply("c", [TaskUpdate("t2", 0, 1)], half_life=8, prior=0, dry_run=False)
            assert await store.reset(["t3"]) == 1
            await store.apply("d", [TaskUpdate("t4", 1, 1)], half_life=8, prior=0, dry_run=False)
        finally:
            await store.close()

    asyncio.run(body())


def test_expired_tasks_leave_room_under_the_cap(redis_url: str, redis_namespace: str) -> None:
    async def body() -> None:
        store = RedisStore(redis_url, namespace=redis_namespace, max_tasks=2, ttl_seconds=0.2)
        try:
            await store.apply("a", [TaskUpdate("t1", 1, 2), TaskUpdate("t2", 1, 2)],
                              half_life=8, prior=0, dry_run=False)
            with pytest.raises(StoreFull):
                await store.apply("b", [TaskUpdate("t3", 1, 2)], half_life=8, prior=0,
                                  dry_run=False)
            await asyncio.sleep(0.4)  # t1 and t2 expire
            ok = await store.apply("c", [TaskUpdate("t3", 1, 2)], half_life=8, prior=0,
                                   dry_run=False)
            assert not ok.degraded
        finally:
            await store.close()
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.zcard(f"{redis_namespace}:tasks:expiry") == 1  # t1, t2 trimmed
        finally:
            client.close()

    asyncio.run(body())


def test_memory_store_cap_zero_means_no_cap() -> None:
    async def body() -> None:
        store = MemoryStore(max_tasks=0)
        await store.apply("a", [TaskUpdate(f"t{i}", 1, 1) for i in range(50)], half_life=8,
                          prior=0, dry_run=False)
        assert len(await store.get([f"t{i}" for i in range(50)])) == 50

    asyncio.run(body())
