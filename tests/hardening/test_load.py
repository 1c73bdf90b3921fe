"""Load: 32 concurrent grpc.aio clients for ``PROXMO_LOAD_SECONDS`` (default 8) on loopback
against a server admitting 8 at once. Zero errors other than the deliberate RESOURCE_EXHAUSTED,
every slot freed afterwards, and the server's memory flat after warm-up."""

from __future__ import annotations

import asyncio
import json

import httpx
from soak.loadgen import run_load

from hardening.conftest import LOAD_SECONDS, StartServer

CLIENTS = 32
MAX_CONCURRENCY = 8


def test_32_clients_no_errors_and_flat_memory(start_server: StartServer) -> None:
    server = start_server("--max-concurrency", str(MAX_CONCURRENCY))
    # Warm-up outside the measurement: the first requests fill caches and thread pools.
    asyncio.run(run_load(server.grpc_target, clients=CLIENTS, seconds=1.5))
    report = asyncio.run(run_load(server.grpc_target, clients=CLIENTS, seconds=LOAD_SECONDS,
                                  pid=server.proc.pid))
    summary = report.as_dict()
    print("\nload:", json.dumps(summary))  # the numbers of docs/reliability.md (pytest -s)
    assert report.errors == {}, summary
    assert report.ok > 0 and report.exhausted > 0, summary  # admission did refuse, deliberately
    assert len(report.rss_samples) >= 8
    # Flat: the last third of the samples within 16 MiB of the first third (a leak of one
    # response per request, ~100 KB, would add tens of MiB over a run of this length).
    assert report.rss_growth_mib() < 16, summary

    assert server.metric("proxmo_inflight_requests") == 0
    assert server.metric("proxmo_rejected_total", reason="internal") == 0
    assert server.metric("proxmo_requests_total", transport="grpc", rpc="ComputeAdvantages",
                         code="OK") >= report.ok
    assert httpx.get(f"{server.http_url}/readyz", timeout=5).status_code == 200
    assert server.proc.poll() is None
