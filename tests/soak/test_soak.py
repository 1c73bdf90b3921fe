"""The long runs of ``make soak`` (collected only with ``PROXMO_SOAK=1``):

- load: 32 grpc.aio clients for ``PROXMO_SOAK_LOAD_SECONDS`` (default 300) against a server
  admitting 8 at once: zero errors but RESOURCE_EXHAUSTED, and no memory growth trend;
- Redis SIGKILLed and restarted ``PROXMO_SOAK_REDIS_CYCLES`` times (default 5) under load:
  zero errors, and the stored totals equal exactly the OK'd batches.

(The 10,000 fuzz cases are tests/hardening/test_fuzz.py with ``PROXMO_FUZZ_CASES=10000``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

from hardening.conftest import RedisServer, StartServer, assert_replayed_exactly
from hardening.test_faults import PER_GROUP, TASKS, Outcome, hammer

from soak.loadgen import run_load

LOAD_SECONDS = float(os.environ.get("PROXMO_SOAK_LOAD_SECONDS", "300"))
REDIS_CYCLES = int(os.environ.get("PROXMO_SOAK_REDIS_CYCLES", "5"))
WARMUP_SECONDS = 60.0


def test_soak_load_memory_is_flat(start_server: StartServer) -> None:
    server = start_server("--max-concurrency", "8")
    # Warm-up: RSS (server + compute workers) climbs for about a minute and a half of load
    # (allocator arenas, worker imports) and is flat after that; measured in docs/reliability.md.
    asyncio.run(run_load(server.grpc_target, clients=32, seconds=WARMUP_SECONDS))
    report = asyncio.run(run_load(server.grpc_target, clients=32, seconds=LOAD_SECONDS,
                                  pid=server.proc.pid, sample_every_s=1.0))
    summary = report.as_dict()
    print("\nsoak load:", json.dumps(summary))
    assert report.errors == {}, summary
    assert report.ok > 0, summary
    # No trend after warm-up: under 1 MiB per minute (a leak of 100 bytes per answer would
    # be ~0.7 MiB/min at this rate), and the last third within 8 MiB of the first third.
    assert report.rss_slope_mib_per_min() < 1.0, summary
    assert report.rss_growth_mib() < 8, summary
    assert server.metric("proxmo_inflight_requests") == 0
    assert server.metric("proxmo_rejected_total", reason="internal") == 0


def test_soak_redis_kill_cycles(start_server: StartServer, redis_server: RedisServer) -> None:
    namespace = "soak-faults"
    server = start_server("--redis-url", redis_server.url, "--namespace", namespace)
    started = time.monotonic()
    cycle_s = 4.0
    total_s = cycle_s * REDIS_CYCLES + 2.0

    async def chaos() -> None:
        for _ in range(REDIS_CYCLES):
            await asyncio.sleep(1.5)
            redis_server.kill()
            await asyncio.sleep(1.5)
            await asyncio.to_thread(redis_server.start)
            await asyncio.sleep(cycle_s - 3.0)

    async def body() -> list[Outcome]:
        load = asyncio.create_task(hammer(
            server.grpc_target, 8, lambda _: time.monotonic() - started < total_s, "soak"))
        await chaos()
        return await load

    outcomes = asyncio.run(body())
    codes = Counter(code for code, _ in outcomes)
    print("\nsoak redis faults:", dict(codes), "cycles:", REDIS_CYCLES)
    assert set(codes) == {"OK"}, codes
    assert_replayed_exactly(server, redis_server, namespace, TASKS, PER_GROUP * codes["OK"],
                            timeout=30)
