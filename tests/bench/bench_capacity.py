"""Capacity bench (``make bench``): what one replica serves, and what each batch costs Redis.

A real ``proxmo-server`` on ONE compute worker process (``--compute-workers 1``: the estimator's
work on one core) with a private ``redis-server`` as its store, fed 16 groups x 8 rollouts x 50
steps ALFWorld-like batches as a trainer sends them (HISTORY source, a fresh request id per batch,
every batch written to the store; 16 tasks a batch):

1. TF-IDF preset: sequential calls (latency p50/p99), then 2 clients back to back (throughput of
   the one compute core: batches/s per core).
2. Encoder preset (ENCODER similarity, the CPU encoder on ``--encoder-threads 1``): cold batches
   (their states never seen before, as in training) one after another: batches/s per encoder core.
3. Per batch, from Redis INFO around the TF-IDF runs: commands, bytes in and out.
4. Memory: the resident set of the server and its worker, after the runs.

Prints a markdown table, the machine and its load average (timings on a shared machine are
noisy). docs/capacity.md turns these into the 1,000-job projection.
Run: .venv/bin/python tests/bench/bench_capacity.py [--seconds 10] [--encoder-batches 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import redis
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_model  # noqa: E402
from support.proxmo_server import ProxmoServer  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402
from workload import alfworld_like_batch  # noqa: E402

OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
           ("grpc.max_send_message_length", 64 << 20)]


def batch(similarity: int, tag: str = "", seed: int = 0) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(
        request_id=f"cap-{uuid.uuid4().hex}",
        config=pb.EstimatorConfig(preset="proxmo", similarity=similarity,
                                  success_rate_source=pb.SUCCESS_RATE_SOURCE_HISTORY),
    )
    for t in alfworld_like_batch(16, 8, 50, seed=seed):
        out = request.trajectories.add(trajectory_id=t.trajectory_id, group_id=t.group_id,
                                       task_id=f"job-{t.group_id}")
        for state, reward, invalid in zip(t.states, t.rewards, t.invalid, strict=True):
            out.steps.add(state=f"{state}{tag}", reward=reward, invalid_action=invalid)
    return request


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    """Resident set of a process and its children (the compute worker), MiB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
        for child in list(pids[1:]):
            grand = Path(f"/proc/{child}/task/{child}/children")
            if grand.exists():
                pids += [int(c) for c in grand.read_text().split()]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def redis_counters(client: redis.Redis) -> tuple[int, int, int]:
    stats = client.info("stats")
    return (int(stats["total_commands_processed"]), int(stats["total_net_input_bytes"]),
            int(stats["total_net_output_bytes"]))


def throughput(target: str, clients: int, seconds: float) -> tuple[float, int]:
    """``clients`` threads calling back to back with fresh TF-IDF batches; (batches/s, errors)."""
    requests = [batch(pb.SIMILARITY_TFIDF, seed=s) for s in range(4)]
    done, errors, lock = [0], [0], threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(c: int) -> None:
        with grpc.insecure_channel(target, options=OPTIONS) as channel:
            stub = pb_grpc.CreditAssignmentServiceStub(channel)
            n = 0
            while time.perf_counter() < stop_at:
                request = requests[(c + n) % len(requests)]
                request.request_id = f"cap-{uuid.uuid4().hex}"
                n += 1
                try:
                    stub.ComputeAdvantages(request, timeout=60)
                except grpc.RpcError:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    done[0] += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - began), errors[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput run length")
    parser.add_argument("--sequential", type=int, default=30, help="sequential TF-IDF calls")
    parser.add_argument("--encoder-batches", type=int, default=3, help="cold encoder batches")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    redis_server = RedisServer(workdir)
    redis_server.start()
    client = redis_server.client()
    rows: list[tuple[str, str]] = []
    try:
        common = ["--compute-workers", "1", "--compute-threads", "1", "--log-level", "warning",
                  "--redis-url", redis_server.url, "--namespace", "capacity"]
        server = ProxmoServer([*common, "--encoder-backend", "none"], workdir / "tfidf.log")
        try:
            server.wait_ready(timeout=120)
            stub = server.stub
            sample = batch(pb.SIMILARITY_TFIDF)
            for _ in range(3):  # warm
                sample.request_id = f"cap-{uuid.uuid4().hex}"
                stub.ComputeAdvantages(sample, timeout=60)
            before = redis_counters(client)
            latencies = []
            for _ in range(args.sequential):
                sample.request_id = f"cap-{uuid.uuid4().hex}"
                t0 = time.perf_counter()
                stub.ComputeAdvantages(sample, timeout=60)
                latencies.append(time.perf_counter() - t0)
            after = redis_counters(client)
            per = [(a - b) / args.sequential for a, b in zip(after, before, strict=True)]
            rate, errors = throughput(server.grpc_target, 2, args.seconds)
            rows += [
                ("request size (16x8x50, protobuf)", f"{sample.ByteSize() / 1024:.0f} KiB"),
                ("TF-IDF latency p50 / p99 (sequential)",
                 f"{statistics.median(latencies) * 1000:.0f} / "
                 f"{percentile(latencies, 99) * 1000:.0f} ms"),
                ("TF-IDF batches/s, 1 compute core (2 clients)",
                 f"{rate:.2f} ({errors} errors)"),
                ("Redis commands per batch", f"{per[0]:.1f}"),
                ("Redis bytes in / out per batch", f"{per[1]:.0f} / {per[2]:.0f}"),
                ("server RSS after TF-IDF runs (server + worker)",
                 f"{rss_mib(server.proc.pid):.0f} MiB"),
            ]
        finally:
            server.stop()
        if args.encoder_batches:
            server = ProxmoServer([*common, "--encoder-backend", "torch-cpu",
                                   "--encoder-threads", "1"], workdir / "encoder.log")
            try:
                server.wait_ready(timeout=300)
                stub = server.stub
                stub.ComputeAdvantages(batch(pb.SIMILARITY_ENCODER, " [warm-up]"), timeout=600)
                times = []
                for i in range(args.encoder_batches):
                    cold = batch(pb.SIMILARITY_ENCODER, f" [{uuid.uuid4().hex[:8]}]", seed=i)
                    t0 = time.perf_counter()
                    stub.ComputeAdvantages(cold, timeout=600)
                    times.append(time.perf_counter() - t0)
                rows += [
                    ("encoder cold batch, 1 encoder thread (median)",
                     f"{statistics.median(times):.1f} s"),
                    ("encoder batches/s per encoder core", f"{1 / statistics.median(times):.3f}"),
                    ("server RSS with the encoder (server + worker)",
                     f"{rss_mib(server.proc.pid):.0f} MiB"),
                ]
            finally:
                server.stop()
    finally:
        client.close()
        redis_server.kill()
    print("| measured | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, {cpu_model()}; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
