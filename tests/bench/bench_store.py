"""Benchmark: the success-rate store's cost per batch of 16 groups (target: < 2 ms on loopback).

Run: .venv/bin/python tests/bench/bench_store.py [--redis-url URL] [--batches N]

Each batch updates 16 distinct tasks (the worst case: 16 task keys in one Lua script) under a
fresh request id, so every apply is a real write. Rows:
- memory apply:       MemoryStore, sequential
- redis apply:        RedisStore on the given Redis, sequential (one round trip each)
- redis apply x16:    16 concurrent writers on one store (latency per apply under contention)
- redis get 16:       reading the 16 records back (one pipelined round trip)
Prints a markdown table (median, p99, mean in ms, and applies per second).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis
from proxmo.store import MemoryStore, RedisStore, SuccessRateStore, TaskUpdate

GROUPS = 16


def batch(i: int) -> list[TaskUpdate]:
    return [TaskUpdate(f"bench-task-{g:02d}", (i + g) % 9, 8) for g in range(GROUPS)]


async def timed_sequential(
    call: Callable[[int], Awaitable[object]], n: int, warmup: int = 50
) -> tuple[list[float], float]:
    for i in range(warmup):
        await call(-1 - i)
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t0)
    return samples, n / (time.perf_counter() - start)


async def timed_concurrent(
    call: Callable[[int], Awaitable[object]], n: int, writers: int
) -> tuple[list[float], float]:
    samples: list[float] = []

    async def writer(w: int) -> None:
        for i in range(w, n, writers):
            t0 = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return samples, n / (time.perf_counter() - start)


def apply_call(store: SuccessRateStore, run_id: str) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> object:
        result = await store.apply(f"{run_id}-{i}", batch(i), half_life=8, prior=0, dry_run=False)
        assert not result.degraded and not result.replayed
        return result

    return call


def row(name: str, samples: list[float], rate: float) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return (
        f"| {name} | {statistics.median(ms):.3f} | {p99:.3f} | {statistics.fmean(ms):.3f} "
        f"| {rate:,.0f} |"
    )


async def main(redis_url: str, batches: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    rows = []
    memory = MemoryStore(namespace=namespace)
    rows.append(row("memory apply", *await timed_sequential(apply_call(memory, "m"), batches)))
    await memory.close()

    store = RedisStore(redis_url, namespace=namespace, timeout_s=1.0)
    try:
        rows.append(row("redis apply", *await timed_sequential(apply_call(store, "s"), batches)))
        rows.append(
            row(
                f"redis apply x{GROUPS} concurrent",
                *await timed_concurrent(apply_call(store, "c"), batches, GROUPS),
            )
        )
        ids = [u.task_id for u in batch(0)]

        async def get(_: int) -> object:
            return await store.get(ids)

        rows.append(row("redis get 16 tasks", *await timed_sequential(get, batches)))
    finally:
        await store.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    print(
        f"success-rate store, {GROUPS} groups (16 tasks) per batch, {batches} batches, "
        f"Redis at {redis_url}"
    )
    print()
    print("| operation | median ms | p99 ms | mean ms | per second |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.redis_url, args.batches))
