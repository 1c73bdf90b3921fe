"""RedisStore on a real local Redis Cluster: 3 masters + 3 replicas (Debian's redis-server,
``redis-cli --cluster create``), including a master SIGKILLed and its replica promoted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from proxmo.store import MemoryStore, RedisStore, StoreFull, TaskUpdate
from proxmo.store.redis import CLUSTER_BUCKETS
from store.conftest import flush_all
from support.redis_topology import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        local.start()
        yield local
    finally:
        local.stop()


def _store(cluster: LocalCluster, namespace: str, **kwargs: object) -> RedisStore:
    # Semantics tests get a roomy timeout (the machine may be loaded); the kill test keeps the
    # default, so the failover is met as in production.
    kwargs.setdefault("timeout_s", 2.0)
    return RedisStore(cluster.url, namespace=namespace, cluster=True, **kwargs)  # type: ignore[arg-type]


def _stored_totals(cluster: LocalCluster, namespace: str, task_ids: list[str]) -> dict[str, int]:
    client = redis.RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        store = RedisStore.__new__(RedisStore)  # only for its key function
        store.namespace, store._cluster = namespace, True
        return {t: int(client.hget(store._task_key(t), "total_trials") or 0) for t in task_ids}
    finally:
        client.close()


def test_cluster_keeps_every_semantics_of_the_store(cluster: LocalCluster) -> None:
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    task_ids = [f"task-{i:03d}" for i in range(48)]

    async def run() -> None:
        store, memory = _store(cluster, namespace), MemoryStore(namespace=namespace)
        try:
            for r in range(3):
                updates = [TaskUpdate(t, (i + r) % 5, 4 + r) for i, t in enumerate(task_ids)]
                got = await store.apply(f"r{r}", updates, half_life=4, prior=0.5, dry_run=False)
                want = await memory.apply(f"r{r}", updates, half_life=4, prior=0.5,
                                          dry_run=False)
                assert not got.degraded and not got.replayed
                assert got.rates == want.rates  # bit for bit, across 48 tasks in many slots
            replay = await store.apply("r1", [TaskUpdate(t, 0, 9) for t in task_ids],
                                       half_life=4, prior=0.5, dry_run=False)
            assert replay.replayed
            records = await store.get(task_ids[:5] + ["unknown"])
            assert [r.task_id for r in records] == task_ids[:5]
            assert [r.updates for r in records] == [3] * 5
            # Paging by prefix merges every bucket's index, on every node, in task-id order.
            seen: list[str] = []
            token = ""
            while True:
                page, token = await store.scan("task-0", 7, token)
                seen += [r.task_id for r in page]
                if not token:
                    break
            assert seen == [t for t in task_ids if t.startswith("task-0")]
            memory_page, _ = await memory.scan("task-", 1000, "")
            cluster_page, _ = await store.scan("task-", 1000, "")
            assert [replace(r, last_update_unix=0) for r in cluster_page] == [
                replace(r, last_update_unix=0) for r in memory_page]
            assert await store.reset(task_ids[:2]) == 2
            assert await store.reset(None) == len(task_ids) - 2
            assert await store.get(task_ids) == []
        finally:
            await store.close()
            await memory.close()

    asyncio.run(run())


def test_a_request_spanning_buckets_counts_each_task_once(cluster: LocalCluster) -> None:
    """A request whose groups were applied in part (a node died mid-request) is completed by its
    retry: the applied groups come back as replays, the rest is applied, each task once."""
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    task_ids = [f"t{i}" for i in range(12)]

    async def run() -> None:
        store = _store(cluster, namespace)
        try:
            assert len({store._bucket(t) for t in task_ids}) > 1  # several slots
            first = await store.apply("req", [TaskUpdate(t, 1, 2) for t in task_ids[:5]],
                                      half_life=8, prior=0, dry_run=False)
            retry = await store.apply("req", [TaskUpdate(t, 1, 2) for t in task_ids],
                                      half_life=8, prior=0, dry_run=False)
            assert not retry.replayed  # part of it was new
            for t in task_ids[:5]:
                assert retry.rates[t] == first.rates[t]
            again = await store.apply("req", [TaskUpdate(t, 1, 2) for t in task_ids],
                                      half_life=8, prior=0, dry_run=False)
            assert again.replayed and again.rates == retry.rates
        finally:
            await store.close()
        assert _stored_totals(cluster, namespace, task_ids) == {t: 2 for t in task_ids}

    asyncio.run(run())


def test_the_task_cap_refuses_a_whole_request_across_buckets(cluster: LocalCluster) -> None:
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    per_bucket = 1
    ids = [f"cap-{i}" for i in range(400)]

    async def run() -> None:
        store = _store(cluster, namespace, max_tasks=per_bucket * CLUSTER_BUCKETS)
        try:
            # Fill exactly one task into one bucket, then ask for it and a new one in that
            # bucket plus tasks of empty buckets: refused whole, nothing stored.
            first = ids[0]
            await store.apply("a", [TaskUpdate(first, 1, 1)], half_life=8, prior=0,
                              dry_run=False)
            same_bucket = next(t for t in ids[1:] if store._bucket(t) == store._bucket(first))
            others = [t for t in ids[1:] if store._bucket(t) != store._bucket(first)][:5]
            with pytest.raises(StoreFull) as refused:
                await store.apply("b", [TaskUpdate(t, 1, 1) for t in [*others, same_bucket]],
                                  half_life=8, prior=0, dry_run=False)
            assert refused.value.field == "task_id"
            assert "store_max_tasks" in refused.value.message
            assert await store.get([*others, same_bucket]) == []
            # Updates of stored tasks always pass.
            ok = await store.apply("c", [TaskUpdate(first, 0, 1)], half_life=8, prior=0,
                                   dry_run=False)
            assert not ok.degraded
        finally:
            await store.close()

    asyncio.run(run())


def test_a_killed_master_loses_nothing_once_its_replica_is_promoted(
    cluster: LocalCluster,
) -> None:
    """A stream of batches while a master is SIGKILLed and its replica promoted: no exception,
    answers degraded during the failover, and afterwards the totals are exactly what was sent."""
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    task_ids = [f"k{i}" for i in range(16)]
    batches = 60

    async def run() -> None:
        store = _store(cluster, namespace, flush_interval_s=0.1, timeout_s=0.25)
        degraded = 0
        try:
            victim = next(iter(cluster.masters()))
            for b in range(batches):
                if b == 20:
                    await asyncio.to_thread(cluster.kill_master_and_wait_for_promotion, victim)
                result = await store.apply(
                    f"b{b}", [TaskUpdate(t, 1, 2) for t in task_ids], half_life=8, prior=0,
                    dry_run=False,
                )
                degraded += result.degraded
            await flush_all(store)
        finally:
            await store.close()
        assert _stored_totals(cluster, namespace, task_ids) == {t: 2 * batches for t in task_ids}

    asyncio.run(run())


def test_cluster_keys_are_hash_tagged() -> None:
    """The cluster layout keeps namespaces apart: every key starts ``<ns>:{<bucket>}:``."""
    store = RedisStore.__new__(RedisStore)
    store.namespace, store._cluster = "runs", True
    key = store._task_key("a}b{c")
    assert key.startswith("runs:{") and key.endswith("}:task:a}b{c")
