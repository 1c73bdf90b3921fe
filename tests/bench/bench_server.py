"""Server bench (``make bench``): what the gRPC front door costs, and how it scales.

1. One 16 groups x 8 rollouts x 50 steps ALFWorld-like batch: the in-process ``Engine.compute``
   call vs the gRPC round trip to a real ``proxmo-server`` subprocess (target <= 1.3x at p50).
2. 8 concurrent clients vs 1 client against that server: throughput ratio (target >= 1.6x),
   zero errors, p50/p99 latency.

Both runs use TF-IDF similarity and dry_run requests (the history does not grow), the server
without the encoder, and the same number of compute threads in-process and in the server; the
server computes on ``--compute-workers`` worker processes (default auto: one per usable core; 0:
threads in the server process, as the in-process side). The concurrent clients send the request
serialized once and do not parse the answers (a generic bytes stub), so that the 8 client threads,
which share the machine with the server, cost as little CPU as possible.
Prints a markdown table and the machine. Timings on a shared machine are noisy: compare the
ratios, which are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_model  # noqa: E402
from support.proxmo_server import ProxmoServer  # noqa: E402
from workload import alfworld_like_batch  # noqa: E402

COMPUTE_METHOD = "/proxmo.v1.CreditAssignmentService/ComputeAdvantages"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def batch_request(groups: int, rollouts: int, steps: int) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(
        dry_run=True,
        config=pb.EstimatorConfig(preset="proxmo", similarity=pb.SIMILARITY_TFIDF),
    )
    for trajectory in alfworld_like_batch(groups, rollouts, steps):
        out = request.trajectories.add(
            trajectory_id=trajectory.trajectory_id,
            group_id=trajectory.group_id,
            task_id=trajectory.task_id,
        )
        for state, reward, invalid in zip(
            trajectory.states, trajectory.rewards, trajectory.invalid, strict=True
        ):
            out.steps.add(state=state, reward=reward, invalid_action=invalid)
        if trajectory.success is not None:
            out.success = trajectory.success
    return request


def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(threads: int, workers: str, log: Path) -> ProxmoServer:
    server = ProxmoServer(
        ["--encoder-backend", "none", "--compute-threads", str(threads),
         "--compute-workers", workers, "--log-level", "warning", "--max-concurrency", "64"],
        log,
    )
    try:
        server.wait_ready(timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


def side_by_side(
    target: str, request: pb.ComputeAdvantagesRequest, threads: int, n: int
) -> tuple[list[float], list[float]]:
    """Alternate one in-process Engine.compute and one gRPC round trip, n times each, so that
    both see the same machine load. Returns (in-process times, round-trip times)."""
    loop = asyncio.new_event_loop()
    engine = Engine(
        store=MemoryStore(),
        embedder=None,
        default_similarity=Similarity.TFIDF,
        compute_threads=threads,
    )
    local: list[float] = []
    remote: list[float] = []
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CreditAssignmentServiceStub(channel)
            for _ in range(3):  # warm both
                loop.run_until_complete(engine.compute(request))
                stub.ComputeAdvantages(request, timeout=60)
            for _ in range(n):
                t0 = time.perf_counter()
                loop.run_until_complete(engine.compute(request))
                local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                stub.ComputeAdvantages(request, timeout=60)
                remote.append(time.perf_counter() - t0)
    finally:
        engine.close()
        loop.close()
    return local, remote


def clients(
    target: str, request: pb.ComputeAdvantagesRequest, n_clients: int, seconds: float
) -> tuple[float, list[float], int]:
    """n_clients threads, each with its own channel, calling back to back for `seconds`.
    Returns (requests per second, latencies, errors)."""
    payload = request.SerializeToString()  # once: the clients send bytes, see the docstring
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(n_clients + 1)
    stop_at: list[float] = [0.0]

    def client() -> None:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(COMPUTE_METHOD)  # bytes in, bytes out
            call(payload, timeout=60)  # connect + warm
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    call(payload, timeout=60)
                except grpc.RpcError:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 30  # provisional, reset at the barrier
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies, errors[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="sequential calls per side")
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency run")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="compute threads (in-process and server); 0: one per CPU",
    )
    parser.add_argument(
        "--compute-workers",
        default="auto",
        help="server compute worker processes: auto (one per usable core), N, or 0 (threads)",
    )
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1

    request = batch_request(16, 8, 50)
    rows = sum(len(t.steps) for t in request.trajectories)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_server_{os.getpid()}.log"
    server = start_server(threads, args.compute_workers, log)
    target = server.grpc_target
    try:
        local, remote = side_by_side(target, request, threads, args.n)
        one_rps, one_lat, one_err = clients(target, request, 1, args.seconds)
        many_rps, many_lat, many_err = clients(target, request, 8, args.seconds)
    finally:
        exit_code = server.stop(timeout=60)

    overhead = statistics.median(remote) / statistics.median(local)
    scaling = many_rps / one_rps
    print(f"machine: {machine()}; shared with other work, so absolute times are noisy")
    print(
        f"batch: 16 groups x 8 rollouts x <=50 steps = {rows} step rows, "
        f"{request.ByteSize() / 1e6:.2f} MB request; TF-IDF, dry run; "
        f"{threads} compute threads in-process; server compute workers "
        f"{args.compute_workers}; server exit code {exit_code}"
    )
    print()
    print("| measurement | p50 ms | p99 ms | throughput req/s | errors | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| in-process Engine.compute | {ms(statistics.median(local))} | "
        f"{ms(percentile(local, 99))} | | 0 | | |"
    )
    print(
        f"| gRPC round trip | {ms(statistics.median(remote))} | {ms(percentile(remote, 99))} "
        f"| | 0 | {overhead:.2f}x of in-process | <= 1.3x "
        f"{'met' if overhead <= 1.3 else 'MISSED'} |"
    )
    print(
        f"| 1 client | {ms(statistics.median(one_lat))} | {ms(percentile(one_lat, 99))} | "
        f"{one_rps:.1f} | {one_err} | | |"
    )
    print(
        f"| 8 concurrent clients | {ms(statistics.median(many_lat))} | "
        f"{ms(percentile(many_lat, 99))} | {many_rps:.1f} | {many_err} | "
        f"{scaling:.2f}x of 1 client | >= 1.6x, 0 errors "
        f"{'met' if scaling >= 1.6 and many_err == 0 else 'MISSED'} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
