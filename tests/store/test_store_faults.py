"""RedisStore under faults: Redis killed and restarted, replies lost, Redis absent.

Each test runs a private redis-server (conftest.RedisServer) or a reply-dropping TCP proxy in
front of the shared Redis, so the faults are real sockets and real processes.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis
from prometheus_client import CollectorRegistry
from proxmo.store import RedisStore, StoreUnavailable, TaskUpdate

TASKS = tuple(f"task-{k}" for k in range(4))


def fast_store(url: str, registry: CollectorRegistry, **kwargs) -> RedisStore:
    """Short timeouts so a fault test runs in seconds."""
    kwargs.setdefault("timeout_s", 0.1)
    kwargs.setdefault("cooldown_s", 0.2)
    kwargs.setdefault("flush_interval_s", 0.05)
    return RedisStore(url, namespace="faults", registry=registry, **kwargs)


async def wait_flushed(store: RedisStore, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while store.buffered_updates and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert store.buffered_updates == 0, "buffer not flushed after Redis came back"


def test_redis_killed_mid_stream_loses_nothing_and_counts_nothing_twice(redis_server) -> None:
    """4 trainers x 50 batches (16 groups over 4 tasks each); SIGKILL Redis after ~60 batches,
    restart it ~60 batches later. Zero exceptions, some answers degraded, and the stored totals
    equal exactly the batches sent."""
    rng = random.Random(11)
    trainers, per_trainer, groups = 4, 50, 16
    plan = [
        [[TaskUpdate(TASKS[g % 4], rng.randint(0, 8), 8) for g in range(groups)]
         for _ in range(per_trainer)]
        for _ in range(trainers)
    ]
    registry = CollectorRegistry()
    sent = 0
    degraded = 0
    health_during_outage = []

    async def body() -> None:
        nonlocal sent, degraded
        store = fast_store(redis_server.url, registry)

        async def trainer(t: int) -> None:
            nonlocal sent, degraded
            for b, updates in enumerate(plan[t]):
                result = await store.apply(f"t{t}-b{b}", updates, half_life=8, prior=0,
                                           dry_run=False)
                sent += 1
                degraded += result.degraded
                if not result.degraded:
                    assert set(result.rates) == set(TASKS)
                await asyncio.sleep(0.02)  # ~200 batches/s in all

        async def chaos() -> None:
            while sent < 60:
                await asyncio.sleep(0.002)
            redis_server.kill()
            killed_at = time.monotonic()
            # Down for at least 0.3 s: longer than the circuit's cooldown, so the flusher's
            # probes fail too, and requests meet both a closed and an open circuit.
            while sent < 120 or time.monotonic() - killed_at < 0.3:
                await asyncio.sleep(0.002)
            health_during_outage.append(await store.health())
            await asyncio.to_thread(redis_server.start)

        await asyncio.gather(chaos(), *(trainer(t) for t in range(trainers)))
        await wait_flushed(store)
        records = {r.task_id: r for r in await store.get(list(TASKS))}
        for task in TASKS:
            updates = [u for batches in plan for batch in batches for u in batch
                       if u.task_id == task]
            assert records[task].total_successes == sum(u.successes for u in updates)
            assert records[task].total_trials == sum(u.trials for u in updates)
            assert records[task].updates == trainers * per_trainer  # one per batch
        assert (await store.health()).ok
        await store.close()

    asyncio.run(body())  # any exception from apply fails the test here
    assert sent == trainers * per_trainer
    assert degraded > 0
    [outage] = health_during_outage
    assert not outage.ok and outage.buffered_updates > 0 and "unreachable" in outage.detail
    sample = registry.get_sample_value
    assert sample("proxmo_store_fallbacks_total") == degraded
    assert sample("proxmo_store_flushed_total") >= degraded
    assert sample("proxmo_store_buffer_dropped_total") == 0
    assert sample("proxmo_store_buffered_updates") == 0
    assert sample("proxmo_store_up") == 1


class ReplyDroppingProxy:
    """TCP proxy to Redis that can swallow Redis's replies: the command is executed, the client
    never hears back (a reply lost after the write)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop_replies = False
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       replies: bool) -> None:
            try:
                while data := await src.read(65536):
                    if replies and self.drop_replies:
                        continue
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


def test_reply_lost_after_the_write_counts_once(redis_server) -> None:
    registry = CollectorRegistry()
    direct = redis.Redis(port=redis_server.port, decode_responses=True)

    async def body() -> None:
        proxy = ReplyDroppingProxy(redis_server.port)
        await proxy.start()
        store = fast_store(f"redis://127.0.0.1:{proxy.port}/0", registry,
                           flush_interval_s=3600)  # flushed by hand below
        ok = await store.apply("before", [TaskUpdate("t", 1, 4)], half_life=8, prior=0,
                               dry_run=False)
        assert not ok.degraded

        proxy.drop_replies = True
        lost = await store.apply("lost", [TaskUpdate("t", 3, 4)], half_life=8, prior=0,
                                 dry_run=False)
        assert lost.degraded and store.buffered_updates == 1
        # Redis did apply it: the write happened, only the reply was lost.
        assert direct.hget("faults:task:t", "updates") == "2"

        proxy.drop_replies = False
        assert await store.flush()
        assert registry.get_sample_value("proxmo_store_replays_total") == 1
        [record] = await store.get(["t"])
        assert (record.updates, record.total_successes, record.total_trials) == (2, 4, 8)
        # The client retries the same request id itself: still a replay, with the first p.
        retry = await store.apply("lost", [TaskUpdate("t", 3, 4)], half_life=8, prior=0,
                                  dry_run=False)
        rho = 0.5 ** (1 / 8)
        assert retry.replayed and retry.rates == {"t": (rho * 1 + 3) / (rho * 4 + 4)}
        await store.close()
        await proxy.stop()

    try:
        asyncio.run(body())
    finally:
        direct.close()


def test_absent_redis_degrades_and_buffer_drops_oldest_counted(redis_server) -> None:
    """Redis down from the start (connection refused): every request succeeds degraded, the
    bounded buffer keeps the newest updates and counts the dropped ones; when Redis starts they
    are written."""
    redis_server.kill()
    registry = CollectorRegistry()

    async def body() -> None:
        store = fast_store(redis_server.url, registry, max_buffered=3, cooldown_s=5,
                           flush_interval_s=0.05)
        results = [
            await store.apply(f"r{i}", [TaskUpdate("t", i, 5)], half_life=8, prior=0,
                              dry_run=False)
            for i in range(5)
        ]
        dry = await store.apply("dry", [TaskUpdate("t", 1, 5)], half_life=8, prior=0,
                                dry_run=True)
        assert all(r.degraded and not r.rates for r in results)
        assert dry.degraded and store.buffered_updates == 3  # a dry run never buffers
        health = await store.health()
        assert not health.ok and health.buffered_updates == 3
        with pytest.raises(StoreUnavailable):
            await store.get(["t"])
        with pytest.raises(StoreUnavailable):
            await store.scan("", 10, "")

        await asyncio.to_thread(redis_server.start)
        await wait_flushed(store)
        [record] = await store.get(["t"])
        # r0 and r1 were dropped (oldest first); r2, r3, r4 were written once each.
        assert (record.updates, record.total_successes, record.total_trials) == (3, 9, 15)
        await store.close()

    asyncio.run(body())
    sample = registry.get_sample_value
    assert sample("proxmo_store_buffer_dropped_total") == 2
    assert sample("proxmo_store_fallbacks_total") == 6
    assert sample("proxmo_store_flushed_total") == 3


def test_hung_redis_costs_one_timeout_then_the_circuit_skips_it() -> None:
    """A server that accepts connections and never answers (a hung Redis): the first apply waits
    for the socket timeout, the next ones go straight to the buffer while the circuit is open."""
    registry = CollectorRegistry()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = fast_store(f"redis://127.0.0.1:{port}/0", registry, timeout_s=0.2,
                           cooldown_s=30, flush_interval_s=3600)
        t0 = time.perf_counter()
        first = await store.apply("r0", [TaskUpdate("t", 1, 2)], half_life=8, prior=0,
                                  dry_run=False)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rest = [
            await store.apply(f"r{i}", [TaskUpdate("t", 1, 2)], half_life=8, prior=0,
                              dry_run=False)
            for i in range(1, 21)
        ]
        rest_s = time.perf_counter() - t0
        assert first.degraded and all(r.degraded for r in rest)
        assert first_s >= 0.2  # it did wait for Redis once
        assert rest_s < 0.2, f"20 applies took {rest_s:.2f} s with the circuit open"
        assert store.buffered_updates == 21
        health = await store.health()  # no ping while the circuit is open: answers at once
        assert not health.ok and "TimeoutError" in health.detail
        assert registry.get_sample_value("proxmo_store_up") == 0
        await store.close()
        server.close()

    asyncio.run(body())


def test_buffered_updates_go_before_a_later_live_update(redis_server) -> None:
    """After an outage, a live apply first drains the buffer, so the task's updates reach
    Redis in the order they were received: S and N equal an outage-free run's."""
    registry = CollectorRegistry()
    updates = [TaskUpdate("t", s, 4) for s in (4, 0, 0, 4)]

    async def body() -> None:
        store = fast_store(redis_server.url, registry, cooldown_s=0.05, flush_interval_s=3600)
        await store.apply("u0", [updates[0]], half_life=2, prior=0, dry_run=False)
        redis_server.kill()
        for i in (1, 2):
            result = await store.apply(f"u{i}", [updates[i]], half_life=2, prior=0,
                                       dry_run=False)
            assert result.degraded
        await asyncio.to_thread(redis_server.start)
        await asyncio.sleep(0.06)  # let the circuit close; the flusher is parked
        live = await store.apply("u3", [updates[3]], half_life=2, prior=0, dry_run=False)
        assert not live.degraded and store.buffered_updates == 0
        [record] = await store.get(["t"])
        rho = 0.5 ** 0.5
        s = n = 0.0
        for u in updates:
            s, n = rho * s + u.successes, rho * n + u.trials
        assert (record.decayed_successes, record.decayed_trials) == (s, n)
        assert live.rates == {"t": s / n}
        await store.close()

    asyncio.run(body())


def test_close_flushes_what_it_can(redis_server) -> None:
    async def body() -> None:
        store = fast_store(redis_server.url, CollectorRegistry(), cooldown_s=60,
                           flush_interval_s=3600)
        redis_server.kill()
        await store.apply("r", [TaskUpdate("t", 1, 2)], half_life=8, prior=0, dry_run=False)
        assert store.buffered_updates == 1
        await asyncio.to_thread(redis_server.start)
        await store.close()  # the circuit is open for 60 s, but close() still drains

    asyncio.run(body())
    direct = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        assert direct.hget("faults:task:t", "total_trials") == "2"
    finally:
        direct.close()
