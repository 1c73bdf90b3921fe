"""Load generator for proxmo-server: N concurrent grpc.aio clients for a bounded time.

Each client has its own channel (as separate trainers would) and sends ComputeAdvantages
back to back. RESOURCE_EXHAUSTED is the server's deliberate admission refusal: counted apart,
followed by a short jittered back-off. Any other non-OK code is an error. With the server's pid,
its resident memory (VmRSS of /proc/<pid>/status, summed over the process and its
children: the compute workers) is sampled through the run.

As a library (tests): ``await run_load(target, clients=32, seconds=10, pid=...)``.
As a script::

    python tests/soak/loadgen.py --spawn --clients 32 --seconds 60      # starts its own server
    python tests/soak/loadgen.py --target 127.0.0.1:50051 --clients 32 --seconds 60 [--pid PID]

It prints one JSON report: throughput, p50/p99 latency, counts per code, RSS trend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

# tests/ on the import path when this file runs as a script (pytest puts it there otherwise).
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from support.proxmo_server import ProxmoServer  # noqa: E402
from support.states import STATES  # noqa: E402

RequestFactory = Callable[[int, int], pb.ComputeAdvantagesRequest]


def batch_request(client: int, index: int, *, groups: int = 8, per_group: int = 4,
                  steps: int = 8) -> pb.ComputeAdvantagesRequest:
    """A dry-run ALFWorld-like batch (groups x per_group trajectories x steps rows).

    Dry run on a fixed set of task ids: the store holds nothing per request, so the server's
    memory must stay flat however long the run.
    """
    request = pb.ComputeAdvantagesRequest(request_id=f"load-{client}-{index}", dry_run=True)
    for g in range(groups):
        for k in range(per_group):
            trajectory = request.trajectories.add(
                trajectory_id=f"t{g}-{k}", group_id=f"g{g}", task_id=f"load-task-{g}")
            for t in range(steps):
                trajectory.steps.add(state=STATES[(t + k * (g + 1) + index) % len(STATES)],
                                     reward=1.0 if t == steps - 1 and k % 2 == 0 else 0.0)
    return request


def _vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:  # exited between the listing and the read
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (2nd field) may hold spaces: split after its closing ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_by_process_kib(pid: int) -> dict[int, int]:
    """VmRSS in KiB of ``pid`` and of every process under it (compute workers, fork server)."""
    return {p: _vm_rss_kib(p) for p in [pid, *_descendants(pid)]}


def rss_kib(pid: int) -> int:
    """The total of ``rss_by_process_kib``: work moved to a worker must not hide a leak."""
    return sum(rss_by_process_kib(pid).values())


@dataclass
class LoadReport:
    clients: int
    seconds: float
    codes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # OK answers only
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, KiB)
    # KiB per process (server, workers) at the first and the last sample.
    rss_first: dict[int, int] = field(default_factory=dict)
    rss_last: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.codes["OK"]

    @property
    def exhausted(self) -> int:
        return self.codes["RESOURCE_EXHAUSTED"]

    @property
    def errors(self) -> dict[str, int]:
        """Every code but OK and the deliberate RESOURCE_EXHAUSTED."""
        return {c: n for c, n in self.codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def rss_after_warmup(self, warmup_fraction: float = 0.3) -> list[tuple[float, int]]:
        start = self.seconds * warmup_fraction
        return [s for s in self.rss_samples if s[0] >= start]

    def rss_growth_mib(self, warmup_fraction: float = 0.3) -> float:
        """Median RSS of the last third of the post-warm-up samples minus that of the first
        third (MiB). A leak grows it with the run; allocator noise does not."""
        samples = [kib for _, kib in self.rss_after_warmup(warmup_fraction)]
        if len(samples) < 6:
            return 0.0
        third = len(samples) // 3
        return (statistics.median(samples[-third:]) - statistics.median(samples[:third])) / 1024

    def rss_slope_mib_per_min(self, warmup_fraction: float = 0.3) -> float:
        """Least-squares slope of RSS over time after the warm-up, MiB per minute."""
        samples = self.rss_after_warmup(warmup_fraction)
        if len(samples) < 3:
            return 0.0
        xs = [t for t, _ in samples]
        ys = [kib / 1024 for _, kib in samples]
        return 60 * statistics.linear_regression(xs, ys).slope

    def as_dict(self) -> dict[str, Any]:
        rss = [kib for _, kib in self.rss_samples]
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
            "resource_exhausted": self.exhausted,
            "errors": self.errors,
            "throughput_rps": round(self.ok / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(self.percentile_ms(0.50), 1),
            "p99_ms": round(self.percentile_ms(0.99), 1),
            "rss_start_mib": round(rss[0] / 1024, 1) if rss else None,
            "rss_max_mib": round(max(rss) / 1024, 1) if rss else None,
            "rss_end_mib": round(rss[-1] / 1024, 1) if rss else None,
            "rss_growth_mib": round(self.rss_growth_mib(), 2),
            "rss_slope_mib_per_min": round(self.rss_slope_mib_per_min(), 2),
            "rss_by_process_mib": {
                pid: [round(self.rss_first.get(pid, 0) / 1024, 1), round(kib / 1024, 1)]
                for pid, kib in self.rss_last.items()
            },
        }


async def run_load(
    target: str,
    *,
    clients: int = 32,
    seconds: float = 10.0,
    pid: int | None = None,
    token: str | None = None,
    make_request: RequestFactory = batch_request,
    sample_every_s: float = 0.25,
    call_timeout_s: float = 60.0,
) -> LoadReport:
    """``clients`` concurrent clients sending for ``seconds``; calls started before the end
    are awaited (their answers count)."""
    report = LoadReport(clients=clients, seconds=seconds)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
    started = time.monotonic()
    end = started + seconds
    # Requests are built before the clock starts: the generator must not be the bottleneck.
    prepared = [[make_request(c, i) for i in range(8)] for c in range(clients)]

    async def client(index: int) -> None:
        rng = random.Random(index)
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.CreditAssignmentServiceStub(channel)
            sent = 0
            while time.monotonic() < end:
                request = prepared[index][sent % len(prepared[index])]
                sent += 1
                t0 = time.monotonic()
                try:
                    await stub.ComputeAdvantages(request, timeout=call_timeout_s,
                                                 metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    report.codes[error.code().name] += 1
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(rng.uniform(0.005, 0.03))  # back off, retry
                    continue
                report.latencies_s.append(time.monotonic() - t0)
                report.codes["OK"] += 1

    async def sample_rss() -> None:
        while time.monotonic() < end:
            if pid is not None:
                by_process = rss_by_process_kib(pid)
                report.rss_first = report.rss_first or by_process
                report.rss_last = by_process
                report.rss_samples.append((time.monotonic() - started, sum(by_process.values())))
            await asyncio.sleep(sample_every_s)

    await asyncio.gather(sample_rss(), *(client(i) for i in range(clients)))
    report.seconds = time.monotonic() - started
    return report


# --- script ---------------------------------------------------------------------------------------


def _spawn(server_args: list[str], log_path: Path) -> ProxmoServer:
    """A ready proxmo-server (tests/support/proxmo_server.py)."""
    server = ProxmoServer(server_args, log_path)
    try:
        server.wait_ready(timeout=180)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port of a running server")
    parser.add_argument("--pid", type=int, help="the server's pid (RSS sampling)")
    parser.add_argument("--spawn", action="store_true", help="start a proxmo-server to load")
    parser.add_argument("--server-args", default="--encoder-backend none --max-concurrency 8",
                        help="flags of the spawned server")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--token", default=os.environ.get("PROXMO_AUTH_TOKEN"))
    args = parser.parse_args(argv)
    if not args.spawn and not args.target:
        parser.error("give --target or --spawn")
    target, pid = args.target, args.pid
    with tempfile.TemporaryDirectory(prefix="proxmo-loadgen-") as scratch:
        server = _spawn(args.server_args.split(), Path(scratch) / "server.log") \
            if args.spawn else None
        if server is not None:
            target, pid = server.grpc_target, server.proc.pid
        try:
            report = asyncio.run(run_load(target, clients=args.clients, seconds=args.seconds,
                                          pid=pid, token=args.token))
        finally:
            if server is not None:
                server.stop(timeout=60)
    print(json.dumps({"target": target, **report.as_dict()}, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
