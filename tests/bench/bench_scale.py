"""Bench (``make bench``): the default path at training scale, against a real server.

A ``proxmo-server`` started with its defaults (ENCODER similarity, the CPU encoder on every
available core up to 2) scores ALFWorld-like batches of 16, 64 and 128 groups x 8 rollouts x 50
steps (tests/bench/workload.py), each way a trainer may send them:

1. cold, one call with a deadline long enough (the encoder's whole time on the critical path);
2. cold, through the default ``ProxmoClient`` (its 30 s default, extended from the server's
   measured encoder rate for big ENCODER batches): attempts and total time;
3. cold, a fixed 30 s deadline, the trainer retrying the same request on DEADLINE_EXCEEDED
   (what the default client did before the rate-sized deadline): attempts and total time; each
   attempt continues from the cache the previous one filled;
4. prefetched: each trajectory's states sent with PrefetchStates as its rollout finishes, the
   background time (it overlaps the rollouts), then the batch's call (the critical path);
5. warm: the same batch again (every state in the LRU);
6. TF-IDF similarity, side by side.

Each mode gets its own state texts (a tag appended to every state: ~3 tokens more a text) so no
mode finds another's work in the cache. dry_run requests: the history does not grow.
Run: .venv/bin/python tests/bench/bench_scale.py [--groups 16,64,128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_encoder import CpuMeter, machine  # noqa: E402
from proxmo_client import ProxmoClient  # noqa: E402
from proxmo_client.errors import DeadlineExceededError  # noqa: E402
from proxmo_client.v1 import proxmo_pb2 as pb  # noqa: E402
from support.proxmo_server import ProxmoServer  # noqa: E402
from workload import alfworld_like_batch  # noqa: E402

FIXED_DEADLINE_S = 30.0
MAX_ATTEMPTS = 8  # a trainer's retry loop gives up here


def batch_request(groups: int, tag: str,
                  similarity: pb.Similarity) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(
        dry_run=True, config=pb.EstimatorConfig(preset="proxmo", similarity=similarity))
    for trajectory in alfworld_like_batch(groups, 8, 50):
        out = request.trajectories.add(trajectory_id=trajectory.trajectory_id,
                                       group_id=trajectory.group_id, task_id=trajectory.task_id)
        for state, reward, invalid in zip(trajectory.states, trajectory.rewards,
                                          trajectory.invalid, strict=True):
            out.steps.add(state=f"{state} [{tag}]", reward=reward, invalid_action=invalid)
    return request


def distinct(request: pb.ComputeAdvantagesRequest) -> int:
    return len({s.state for t in request.trajectories for s in t.steps})


def with_retries(client: ProxmoClient, request: pb.ComputeAdvantagesRequest,
                 timeout: float | None) -> tuple[int, bool, list[str]]:
    """A trainer's loop: the same request (same request_id) again on DEADLINE_EXCEEDED.
    Returns (attempts, whether one succeeded, the servers' messages of the failed ones)."""
    failures: list[str] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            client.compute_advantages(request, timeout=timeout)
            return attempt, True, failures
        except DeadlineExceededError as error:
            failures.append(str(error))
    return MAX_ATTEMPTS, False, failures


MODES = ("one", "default", "fixed", "prefetch", "tfidf")  # prefetch includes warm


def run_size(client: ProxmoClient, groups: int, modes: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    name = f"{groups}x8x50"

    def row(mode: str, meter: CpuMeter, request: pb.ComputeAdvantagesRequest,
            **extra: Any) -> None:
        rows.append({"batch": name, "mode": mode, "steps": sum(len(t.steps) for t in
                     request.trajectories), "distinct": distinct(request),
                     "seconds": meter.seconds, "other_cores": meter.other_cores, **extra})
        print(json.dumps(rows[-1]), flush=True)

    if "one" in modes:
        request = batch_request(groups, f"one-{groups}", pb.SIMILARITY_ENCODER)
        with CpuMeter() as meter:
            response = client.compute_advantages(request, timeout=3600)
        row("ENCODER cold, one call", meter, request,
            encoded=response.timing.num_encoded_states, attempts=1)

    if "default" in modes:
        request = batch_request(groups, f"default-{groups}", pb.SIMILARITY_ENCODER)
        with CpuMeter() as meter:
            attempts, ok, _ = with_retries(client, request, None)
        row("ENCODER cold, default client", meter, request, attempts=attempts, succeeded=ok)

    if "fixed" in modes and groups > 16:
        request = batch_request(groups, f"fixed-{groups}", pb.SIMILARITY_ENCODER)
        with CpuMeter() as meter:
            attempts, ok, failures = with_retries(client, request, FIXED_DEADLINE_S)
        row(f"ENCODER cold, fixed {FIXED_DEADLINE_S:.0f} s deadline + retries", meter, request,
            attempts=attempts, succeeded=ok, failures=failures)

    if "prefetch" in modes:
        prefetched_and_warm(client, groups, row)
    if "tfidf" in modes:
        request = batch_request(groups, f"tfidf-{groups}", pb.SIMILARITY_TFIDF)
        with CpuMeter() as meter:
            client.compute_advantages(request, timeout=3600)
        row("TF-IDF", meter, request)
    return rows


def prefetched_and_warm(client: ProxmoClient, groups: int, row: Callable[..., None]) -> None:
    """Each trajectory's states prefetched as its rollout finishes, then the batch's call;
    then the same call again (warm)."""
    request = batch_request(groups, f"prefetch-{groups}", pb.SIMILARITY_ENCODER)
    with CpuMeter() as background:
        for trajectory in request.trajectories:  # as each rollout finishes
            client.prefetch_states([s.state for s in trajectory.steps], timeout=60)
        client.prefetch_states([s.state for t in request.trajectories for s in t.steps],
                               wait=True, timeout=3600)
    row("ENCODER prefetched: background (overlaps rollouts)", background, request)
    with CpuMeter() as meter:
        response = client.compute_advantages(request, timeout=3600)
    row("ENCODER prefetched: the batch's call (critical path)", meter, request,
        encoded=response.timing.num_encoded_states)

    with CpuMeter() as meter:
        response = client.compute_advantages(request, timeout=3600)
    row("ENCODER warm", meter, request, encoded=response.timing.num_encoded_states)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="16,64,128")
    parser.add_argument("--modes", default=",".join(MODES), help="a subset of " + ",".join(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    log = Path("/tmp") / f"proxmo-bench-scale-{time.time_ns()}.log"
    server = ProxmoServer(["--log-level", "warning"], log)
    started = time.perf_counter()
    try:
        server.wait_ready(timeout=900)  # minutes on a loaded machine
        with ProxmoClient(server.grpc_target) as client:
            info = client.server_info()
            print(f"server: {info.encoder.backend} {info.encoder.dtype} on "
                  f"{info.encoder.device}, default similarity "
                  f"{pb.Similarity.Name(info.default_similarity)}, warm-up rate "
                  f"{info.encoder.states_per_second:.0f} states/s", flush=True)
            modes = set(args.modes.split(","))
            rows = [r for g in args.groups.split(",") for r in run_size(client, int(g), modes)]
            rate = client.server_info().encoder.states_per_second
    finally:
        server.stop()
    print(f"\n## Training-scale batches through a default server ({machine()})\n")
    print(f"Measured encoder rate at the end: {rate:.0f} states/s; bench wall time "
          f"{time.perf_counter() - started:.0f} s.\n")
    print("| batch | distinct states | mode | seconds | attempts | encoded | other cores |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        attempts = f"{r.get('attempts', '')}{'' if r.get('succeeded', True) else ' (gave up)'}"
        print(f"| {r['batch']} | {r['distinct']} | {r['mode']} | {r['seconds']:.2f} | "
              f"{attempts} | {r.get('encoded', '')} | {r['other_cores']:.2f} |")
    for r in rows:
        for k, message in enumerate(r.get("failures", [])):
            print(f"\n{r['batch']}, attempt {k + 1}: {message}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
