"""Semantics both stores share (parametrized: MemoryStore and RedisStore on a real Redis)."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
import redis
from prometheus_client import CollectorRegistry
from proxmo.core.batch import ValidationError
from proxmo.store import MemoryStore, RedisStore, TaskUpdate, create_store

RHO_HALF_LIFE_2 = math.sqrt(0.5)  # 0.5 ** (1 / 2)


def test_first_update_equals_batch_estimate(make_store) -> None:
    async def body() -> None:
        store = make_store()
        result = await store.apply(
            "r1", [TaskUpdate("task-a", 3, 8)], half_life=8, prior=0, dry_run=False
        )
        assert result.rates == {"task-a": 3 / 8}
        assert not result.replayed and not result.degraded
        [record] = await store.get(["task-a"])
        assert (record.decayed_successes, record.decayed_trials) == (3.0, 8.0)
        assert (record.total_successes, record.total_trials, record.updates) == (3, 8, 1)
        assert record.success_rate == 3 / 8
        assert abs(record.last_update_unix - time.time()) < 60
        await store.close()

    asyncio.run(body())


def test_decay_by_hand_half_life_2_prior_1(make_store) -> None:
    """Three updates (3/4, 1/4, 4/4), rho = sqrt(1/2), a = b = 1, worked by hand:

    1: S = 3,             N = 4,              p = (3 + 1) / (4 + 2) = 2/3 (no history: S = N = 0)
    2: S = 3 rho + 1,     N = 4 rho + 4,      p = (3 rho + 2) / (4 rho + 6)
    3: S = 5.5 + rho,     N = 6 + 4 rho,      p = (6.5 + rho) / (8 + 4 rho)
       (S = rho (3 rho + 1) + 4 = 1.5 + rho + 4; N = rho (4 rho + 4) + 4 = 2 + 4 rho + 4)
    """
    rho = RHO_HALF_LIFE_2

    async def body() -> None:
        store = make_store()
        ps = []
        for i, successes in enumerate((3, 1, 4)):
            result = await store.apply(
                f"r{i}", [TaskUpdate("t", successes, 4)], half_life=2, prior=1, dry_run=False
            )
            ps.append(result.rates["t"])
        assert ps[0] == (3 + 1) / (4 + 2)  # the prior shrinks a task's first batch too
        assert ps[1] == pytest.approx((3 * rho + 2) / (4 * rho + 6), abs=1e-15)
        assert ps[2] == pytest.approx((6.5 + rho) / (8 + 4 * rho), abs=1e-15)
        assert ps[2] == pytest.approx(0.6655728, abs=1e-7)  # the same, as a number
        [record] = await store.get(["t"])
        assert record.decayed_successes == pytest.approx(5.5 + rho, abs=1e-14)
        assert record.decayed_trials == pytest.approx(6 + 4 * rho, abs=1e-14)
        # Reads use the store's default prior (0 here): S / N.
        assert record.success_rate == pytest.approx((5.5 + rho) / (6 + 4 * rho), abs=1e-15)
        assert (record.total_successes, record.total_trials, record.updates) == (8, 12, 3)
        await store.close()

    asyncio.run(body())


def test_groups_of_one_task_count_as_one_update(make_store) -> None:
    async def body() -> None:
        store = make_store()
        updates = [TaskUpdate("t", 1, 4), TaskUpdate("u", 2, 2), TaskUpdate("t", 3, 4)]
        result = await store.apply("r", updates, half_life=8, prior=0, dry_run=False)
        assert result.rates == {"t": 4 / 8, "u": 1.0}
        t, u = await store.get(["t", "u"])
        assert (t.updates, t.total_successes, t.total_trials) == (1, 4, 8)
        assert (u.updates, u.total_successes, u.total_trials) == (1, 2, 2)
        await store.close()

    asyncio.run(body())


def test_replay_of_a_request_id_writes_nothing_and_reports_first_p(make_store) -> None:
    async def body() -> None:
        registry = CollectorRegistry()
        store = make_store(registry=registry)
        first = await store.apply("same", [TaskUpdate("t", 2, 8)], half_life=4, prior=0,
                                  dry_run=False)
        again = await store.apply("same", [TaskUpdate("t", 2, 8)], half_life=4, prior=0,
                                  dry_run=False)
        # Even with different content, an applied id is a replay of its first application.
        other = await store.apply("same", [TaskUpdate("t", 8, 8), TaskUpdate("x", 1, 1)],
                                  half_life=4, prior=0, dry_run=False)
        assert not first.replayed
        assert again.replayed and again.rates == first.rates == {"t": 0.25}
        assert other.replayed and other.rates == first.rates
        [record] = await store.get(["t", "x"])
        assert (record.updates, record.total_successes, record.total_trials) == (1, 2, 8)
        assert registry.get_sample_value("proxmo_store_replays_total") == 2
        await store.close()

    asyncio.run(body())


def test_empty_request_id_is_never_a_replay(make_store) -> None:
    async def body() -> None:
        store = make_store()
        for _ in range(3):
            result = await store.apply("", [TaskUpdate("t", 1, 2)], half_life=8, prior=0,
                                       dry_run=False)
            assert not result.replayed
        [record] = await store.get(["t"])
        assert (record.updates, record.total_trials) == (3, 6)
        await store.close()

    asyncio.run(body())


def test_dry_run_writes_nothing_and_reports_the_real_p(make_store) -> None:
    async def body() -> None:
        store = make_store()
        await store.apply("r0", [TaskUpdate("t", 1, 4)], half_life=3, prior=0.5, dry_run=False)
        dry = await store.apply("r1", [TaskUpdate("t", 4, 4), TaskUpdate("new", 1, 3)],
                                half_life=3, prior=0.5, dry_run=True)
        [record] = await store.get(["t", "new"])  # "new" was not written
        assert (record.updates, record.total_trials) == (1, 4)
        # The dry run did not claim r1: applying it for real gives the same p's.
        real = await store.apply("r1", [TaskUpdate("t", 4, 4), TaskUpdate("new", 1, 3)],
                                 half_life=3, prior=0.5, dry_run=False)
        assert not real.replayed
        assert dry.rates == real.rates
        assert real.rates["new"] == (1 + 0.5) / (3 + 1)  # no history: S = N = 0, then the prior
        # A dry run of an applied id reports the first application, like a replay.
        dry_again = await store.apply("r1", [TaskUpdate("t", 0, 4)], half_life=3, prior=0.5,
                                      dry_run=True)
        assert dry_again.replayed and dry_again.rates == real.rates
        await store.close()

    asyncio.run(body())


def test_16_concurrent_writers_give_exact_counts(make_store) -> None:
    """16 clients x 12 batches on the same 3 tasks, all at once.

    Totals must be exact, and since every update of a task has N_b = 8, its decayed N after k
    updates is 8 (1 - rho^k) / (1 - rho) whatever the order: a lost read-modify-write would
    show there too.
    """
    clients, batches, tasks = 16, 12, ("t0", "t1", "t2")
    rng = random.Random(7)
    plan = [
        [{t: rng.randint(0, 8) for t in tasks} for _ in range(batches)] for _ in range(clients)
    ]

    async def body() -> None:
        store0 = make_store()
        # Redis: one store (own connection pool) per client, like 16 replicas; memory: shared.
        stores = [store0] + [
            make_store() if isinstance(store0, RedisStore) else store0
            for _ in range(clients - 1)
        ]

        async def client(c: int) -> None:
            for b, batch in enumerate(plan[c]):
                updates = [TaskUpdate(t, s, 8) for t, s in batch.items()]
                result = await stores[c].apply(f"c{c}-b{b}", updates, half_life=8, prior=0,
                                               dry_run=False)
                assert not result.degraded and not result.replayed

        await asyncio.gather(*(client(c) for c in range(clients)))
        records = {r.task_id: r for r in await store0.get(list(tasks))}
        rho = 0.5 ** (1 / 8)
        k = clients * batches
        for t in tasks:
            expected_successes = sum(batch[t] for per_client in plan for batch in per_client)
            assert records[t].total_successes == expected_successes
            assert records[t].total_trials == 8 * k
            assert records[t].updates == k
            assert records[t].decayed_trials == pytest.approx(8 * (1 - rho**k) / (1 - rho),
                                                              rel=1e-12)
        for s in set(stores):
            await s.close()

    asyncio.run(body())


def test_namespaces_are_isolated(make_store, namespace) -> None:
    async def body() -> None:
        one = make_store()
        two = make_store(namespace=namespace + "-other")
        await one.apply("r", [TaskUpdate("t", 1, 1)], half_life=8, prior=0, dry_run=False)
        # Same request id in another namespace: its own claim, not a replay.
        result = await two.apply("r", [TaskUpdate("t", 0, 1)], half_life=8, prior=0,
                                 dry_run=False)
        assert not result.replayed and result.rates == {"t": 0.0}
        assert [r.success_rate for r in await one.get(["t"])] == [1.0]
        assert [r.success_rate for r in await two.get(["t"])] == [0.0]
        assert await two.reset(None) == 1
        assert await two.get(["t"]) == []
        assert [r.total_successes for r in await one.get(["t"])] == [1]
        await one.close()
        await two.close()

    asyncio.run(body())


def test_ttl_expires_tasks_and_request_claims(make_store) -> None:
    async def body() -> None:
        store = make_store(ttl_seconds=0.3, request_ttl_seconds=0.3)
        await store.apply("r", [TaskUpdate("t", 1, 2)], half_life=8, prior=0, dry_run=False)
        assert len(await store.get(["t"])) == 1
        await asyncio.sleep(0.45)
        assert await store.get(["t"]) == []
        assert await store.scan("", 10, "") == ([], "")
        again = await store.apply("r", [TaskUpdate("t", 1, 2)], half_life=8, prior=0,
                                  dry_run=False)
        assert not again.replayed  # the claim expired with its TTL
        [record] = await store.get(["t"])
        assert record.updates == 1  # a fresh history, not the expired one
        await store.close()

    asyncio.run(body())


def test_ttl_slides_with_each_update(make_store) -> None:
    async def body() -> None:
        store = make_store(ttl_seconds=0.5)
        for i in range(3):
            await store.apply(f"r{i}", [TaskUpdate("t", 1, 2)], half_life=8, prior=0,
                              dry_run=False)
            await asyncio.sleep(0.2)
        [record] = await store.get(["t"])  # 0.6 s after the first (> TTL), 0.2 after the last
        assert record.updates == 3
        await store.close()

    asyncio.run(body())


def test_scan_pages_by_prefix_in_task_id_order(make_store) -> None:
    ids = [f"alf/{i:02d}" for i in range(12)] + ["alfa", "alf", "b/1", "al", "alf/é", "alf/z"]

    async def body() -> None:
        store = make_store()
        for i, task_id in enumerate(ids):
            await store.apply(f"r{i}", [TaskUpdate(task_id, 1, 2)], half_life=8, prior=0,
                              dry_run=False)
        expected = sorted(t for t in ids if t.startswith("alf/"))
        pages, token = [], ""
        while True:
            page, token = await store.scan("alf/", 5, token)
            pages.append([r.task_id for r in page])
            if not token:
                break
        assert [len(p) for p in pages] == [5, 5, 4]
        assert sum(pages, []) == expected
        everything, token = await store.scan("", 0, "")  # 0: the default page size
        assert token == "" and [r.task_id for r in everything] == sorted(ids)
        exact, token = await store.scan("alfa", 10, "")
        assert [r.task_id for r in exact] == ["alfa"] and token == ""
        assert await store.scan("zzz", 10, "") == ([], "")
        await store.close()

    asyncio.run(body())


def test_reset_one_task_and_the_namespace(make_store) -> None:
    async def body() -> None:
        store = make_store()
        for i, task_id in enumerate(("a", "b", "c")):
            await store.apply(f"r{i}", [TaskUpdate(task_id, 1, 1)], half_life=8, prior=0,
                              dry_run=False)
        assert await store.reset(["b", "missing"]) == 1
        assert [r.task_id for r in await store.get(["a", "b", "c"])] == ["a", "c"]
        assert [r.task_id for r in (await store.scan("", 10, ""))[0]] == ["a", "c"]
        assert await store.reset(None) == 2
        assert await store.get(["a", "b", "c"]) == []
        assert await store.scan("", 10, "") == ([], "")
        # A reset history starts again from the batch estimate.
        result = await store.apply("r9", [TaskUpdate("a", 0, 2)], half_life=8, prior=0,
                                   dry_run=False)
        assert result.rates == {"a": 0.0}
        await store.close()

    asyncio.run(body())


@pytest.mark.parametrize(
    ("updates", "half_life", "prior", "field"),
    [
        ([TaskUpdate("t", 1, 2), TaskUpdate("u", 0, 0)], 8, 0, "updates[1].trials"),
        ([TaskUpdate("t", 3, 2)], 8, 0, "updates[0].successes"),
        ([TaskUpdate("t", -1, 2)], 8, 0, "updates[0].successes"),
        ([TaskUpdate("t", 1, 2)], 0, 0, "config.history_half_life"),
        ([TaskUpdate("t", 1, 2)], math.inf, 0, "config.history_half_life"),
        ([TaskUpdate("t", 1, 2)], 8, -1, "config.history_prior"),
        ([TaskUpdate("t", 1, 2)], 8, math.nan, "config.history_prior"),
    ],
)
def test_bad_updates_name_the_field(make_store, updates, half_life, prior, field) -> None:
    async def body() -> None:
        store = make_store()
        with pytest.raises(ValidationError) as error:
            await store.apply("r", updates, half_life=half_life, prior=prior, dry_run=False)
        assert error.value.field == field
        assert await store.get(["t", "u"]) == []  # nothing half-written
        await store.close()

    asyncio.run(body())


def test_bad_paging_and_namespace_name_the_field(make_store) -> None:
    async def body() -> None:
        store = make_store()
        with pytest.raises(ValidationError) as error:
            await store.scan("", -1, "")
        assert error.value.field == "page_size"
        with pytest.raises(ValidationError) as error:
            await store.scan("", 10, "not base64!")
        assert error.value.field == "page_token"
        await store.close()
        for bad in ("", "a b", "runs:task:x", "a:req", "a*"):
            with pytest.raises(ValidationError) as error:
                make_store(namespace=bad)
            assert error.value.field == "namespace"

    asyncio.run(body())


def test_empty_update_list_touches_nothing(make_store) -> None:
    async def body() -> None:
        store = make_store()
        result = await store.apply("r", [], half_life=8, prior=0, dry_run=False)
        assert (dict(result.rates), result.replayed, result.degraded) == ({}, False, False)
        assert await store.scan("", 10, "") == ([], "")
        await store.close()

    asyncio.run(body())


def test_metrics_on_a_fresh_registry(make_store) -> None:
    async def body() -> None:
        registry = CollectorRegistry()
        store = make_store(registry=registry)
        await store.apply("r", [TaskUpdate("t", 1, 1)], half_life=8, prior=0, dry_run=False)
        await store.apply("r", [TaskUpdate("t", 1, 1)], half_life=8, prior=0, dry_run=False)
        await store.get(["t"])
        sample = registry.get_sample_value
        assert sample("proxmo_store_duration_seconds_count", {"op": "apply"}) == 2
        assert sample("proxmo_store_duration_seconds_count", {"op": "get"}) == 1
        assert sample("proxmo_store_replays_total") == 1
        assert sample("proxmo_store_fallbacks_total") == 0
        assert sample("proxmo_store_buffered_updates") == 0
        assert sample("proxmo_store_up") == 1
        health = await store.health()
        assert health.ok and health.buffered_updates == 0
        await store.close()

    asyncio.run(body())


def test_memory_and_redis_agree_to_the_bit(redis_url, redis_namespace) -> None:
    """Same updates, same float64 operations (Python and Lua): identical p, S and N."""
    rng = random.Random(3)
    plan = [
        [TaskUpdate(f"t{k}", rng.randint(0, 5), 5) for k in range(rng.randint(1, 4))]
        for _ in range(30)
    ]

    async def body() -> None:
        memory = MemoryStore(namespace=redis_namespace)
        remote = RedisStore(redis_url, namespace=redis_namespace)
        for i, updates in enumerate(plan):
            half_life, prior = 1 + i % 7 * 1.3, i % 3 * 0.7
            a = await memory.apply(f"r{i}", updates, half_life=half_life, prior=prior,
                                   dry_run=False)
            b = await remote.apply(f"r{i}", updates, half_life=half_life, prior=prior,
                                   dry_run=False)
            assert a.rates == b.rates  # exact float equality
        ids = [f"t{k}" for k in range(4)]
        fields = ("decayed_successes", "decayed_trials", "total_successes", "total_trials",
                  "updates", "success_rate")
        for x, y in zip(await memory.get(ids), await remote.get(ids), strict=True):
            assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]
        await memory.close()
        await remote.close()

    asyncio.run(body())


def test_create_store_picks_by_url(redis_url, redis_namespace) -> None:
    async def body() -> None:
        memory = create_store("", namespace=redis_namespace)
        remote = create_store(redis_url, namespace=redis_namespace, timeout_s=0.5)
        assert isinstance(memory, MemoryStore) and memory.name == "memory"
        assert isinstance(remote, RedisStore) and remote.name == "redis"
        assert remote.namespace == redis_namespace
        await memory.close()
        await remote.close()

    asyncio.run(body())


def test_a_claim_written_before_version_2_is_still_a_replay(redis_url, redis_namespace) -> None:
    """Rolling upgrade: a request id claimed by an older replica ([task_id, p, ...]) is a replay
    that stores nothing and reports the p of its first application."""
    client = redis.Redis.from_url(redis_url)
    client.set(f"{redis_namespace}:req:old-replica", '["t", 0.375, "u", 1]', px=60_000)
    client.close()

    async def body() -> None:
        store = RedisStore(redis_url, namespace=redis_namespace)
        again = await store.apply("old-replica", [TaskUpdate("t", 2, 8), TaskUpdate("u", 1, 1)],
                                  half_life=4, prior=0, dry_run=False)
        assert again.replayed and again.rates == {"t": 0.375, "u": 1.0}
        assert await store.get(["t", "u"]) == []  # nothing stored by the replay
        fresh = await store.apply("new", [TaskUpdate("t", 2, 8)], half_life=4, prior=0,
                                  dry_run=False)
        replay = await store.apply("new", [TaskUpdate("t", 2, 8)], half_life=4, prior=0,
                                   dry_run=False)
        assert not fresh.replayed and replay.replayed and replay.rates == fresh.rates
        await store.close()

    asyncio.run(body())
