"""Benchmark: the worst request the default limits accept, its time and peak memory.

Run: .venv/bin/python tests/bench/bench_worst_case.py [--cap N] [--total-steps N]

The request: max_total_steps (200,000) steps in groups of exactly max_group_distinct_states
(1,024) distinct states each, the shape that maximizes PSA's work (sum over groups of m_g^2 <=
cap x steps). Every state is a distinct text of 40 words drawn from 2,048, so TF-IDF keeps its
1,024 features and every group uses nearly all of them: the densest features PSA can be given
(about 50 MB of request, under the 64 MiB message limit). Each case runs in a fresh process
through Engine.compute (in-process threads, what `proxmo compute` does; a server's compute
worker runs the same code): convert, validate, TF-IDF, the estimator and the response. Prints
wall and CPU seconds and the process's peak RSS (ru_maxrss) before and after the call, for
TFIDF (paper preset) and EXACT (paper preset, similarity EXACT: no PSA).

Then the same TFIDF request is sent to a real proxmo-server (default compute workers: one per
core) while one client sends a small 16x8x50 batch in a loop: the small batch's latency
percentiles alone and meanwhile show what the worst request does to other trainers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_server import batch_request  # noqa: E402
from machine import cpu_model  # noqa: E402
from proxmo.limits import Limits  # noqa: E402
from proxmo_client.v1 import proxmo_pb2 as pb  # noqa: E402
from support.proxmo_server import ProxmoServer  # noqa: E402

WORDS = [f"w{i:04d}" for i in range(2048)]
WORDS_PER_STATE = 40
CASES = {"TFIDF": pb.SIMILARITY_TFIDF, "EXACT": pb.SIMILARITY_EXACT}


def worst_request(total_steps: int, cap: int, max_steps: int, seed: int = 0) -> bytes:
    """Groups of `cap` distinct states (the last one smaller), split into trajectories of at
    most `max_steps` steps; rewards 0 except a success at the end of every other trajectory."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    request = pb.ComputeAdvantagesRequest(request_id="worst-case", dry_run=True)
    done, group = 0, 0
    while done < total_steps:
        size = min(cap, total_steps - done)
        per_trajectory = -(-size // -(-size // max_steps))  # even split under max_steps
        for k, start in enumerate(range(0, size, per_trajectory)):
            trajectory = request.trajectories.add(
                trajectory_id=f"g{group}-t{k}", group_id=f"g{group}"
            )
            n = min(per_trajectory, size - start)
            texts = rng.choice(words, size=(n, WORDS_PER_STATE))
            for t in range(n):
                reward = 1.0 if (t == n - 1 and k % 2 == 0) else 0.0
                trajectory.steps.add(state=" ".join(texts[t]), reward=reward)
        done += size
        group += 1
    return request.SerializeToString()


def measure(path: str, similarity: int) -> dict[str, float]:
    """In this (fresh) process: parse the request, then time Engine.compute on it."""
    import asyncio

    from proxmo.core.config import Similarity
    from proxmo.engine import Engine
    from proxmo.store.memory import MemoryStore

    request = pb.ComputeAdvantagesRequest()
    with open(path, "rb") as file:
        request.ParseFromString(file.read())
    request.config.preset = "paper"
    request.config.similarity = similarity  # type: ignore[assignment]
    engine = Engine(
        store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF, compute_threads=1
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall, cpu = time.perf_counter(), time.process_time()
    response = asyncio.run(engine.compute(request))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine.close()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before_mib": before,
        "rss_peak_mib": after,
        "steps": response.timing.num_steps,
        "states": response.timing.num_unique_states,
        "groups": len(response.groups),
        "featurize_s": response.timing.featurize_ns / 1e9,
        "estimator_s": response.timing.compute_ns / 1e9,
    }


def _percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return f"n {len(ordered)}, p50 {pick(0.5) * 1e3:.0f} ms, p99 {pick(0.99) * 1e3:.0f} ms"


def meanwhile(data: bytes) -> None:
    """A small batch's latency alone, then while the worst request runs on a real server."""
    import threading
    from pathlib import Path

    small = batch_request(16, 8, 50)
    small.config.preset = "paper"
    worst = pb.ComputeAdvantagesRequest.FromString(data)
    worst.config.preset = "paper"
    with tempfile.TemporaryDirectory() as tmp, ProxmoServer(
        ["--encoder-backend", "none", "--log-level", "warning"], Path(tmp) / "server.log"
    ) as server:
        server.wait_ready(timeout=120)
        stub = server.stub

        def loop(seconds: float) -> list[float]:
            out, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                stub.ComputeAdvantages(small, timeout=30)
                out.append(time.perf_counter() - start)
            return out

        loop(2.0)  # warm-up
        alone = loop(10.0)
        done: dict[str, float] = {}

        def send_worst() -> None:
            start = time.perf_counter()
            stub.ComputeAdvantages(worst, timeout=600)
            done["s"] = time.perf_counter() - start

        thread = threading.Thread(target=send_worst)
        thread.start()
        during: list[float] = []
        while thread.is_alive():
            during += loop(1.0)
        thread.join()
    print(f"small 16x8x50 batch alone: {_percentiles(alone)}")
    print(f"worst request over gRPC: {done['s']:.1f} s; the small batch meanwhile: "
          f"{_percentiles(during)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    limits = Limits()
    parser.add_argument("--cap", type=int, default=limits.max_group_distinct_states)
    parser.add_argument("--total-steps", type=int, default=limits.max_total_steps)
    parser.add_argument(
        "--child", nargs=2, metavar=("REQUEST", "SIMILARITY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return

    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores available")
    data = worst_request(args.total_steps, args.cap, limits.max_steps_per_trajectory)
    print(
        f"request: {args.total_steps:,} steps in groups of {args.cap:,} distinct states, "
        f"{len(data) / 2**20:.1f} MiB on the wire"
    )
    print()
    print(
        "| similarity | groups | steps | distinct texts | wall s | CPU s | of which TF-IDF s "
        "| estimator s | RSS before MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.NamedTemporaryFile(suffix=".pb") as file:
        file.write(data)
        file.flush()
        for name, similarity in CASES.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", file.name, str(similarity)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {name} | {result['groups']:,} | {result['steps']:,} | "
                f"{result['states']:,} | {result['wall_s']:.2f} | {result['cpu_s']:.2f} | "
                f"{result['featurize_s']:.2f} | {result['estimator_s']:.2f} | "
                f"{result['rss_before_mib']:.0f} | {result['rss_peak_mib']:.0f} |",
                flush=True,
            )
    print()
    meanwhile(data)


if __name__ == "__main__":
    main()
