"""Benchmark: what counting a request on its bytes (``proxmo.server.prescan``) costs, against
what parsing it costs, for the largest request the default limits accept and for oversized
ones that the count refuses before any parse.

Run: .venv/bin/python tests/bench/bench_prescan.py

Rows (one process, one run each, seconds):
- gRPC, largest accepted: 200 trajectories x 1,000 steps of ~45-character states (11 MB):
  the wire count, then the protobuf decode it lets through;
- gRPC, 4M empty trajectories (8 MB): the wire count (refuses) against the decode it avoids;
- REST, 8M empty trajectories (24 MB of JSON): the JSON count (refuses);
- REST, worst strings: one 60 MB state full of braces and escapes (the count's slow path).
Prints a markdown table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from proxmo.errors import LimitExceeded
from proxmo.limits import Limits
from proxmo.server.prescan import check_json_counts, check_wire_counts
from proxmo_client.v1 import proxmo_pb2 as pb

Request = pb.ComputeAdvantagesRequest


def seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    try:
        call()
    except LimitExceeded:
        pass
    return time.perf_counter() - started


def main() -> None:
    limits = Limits()
    largest = Request()
    for i in range(200):
        trajectory = largest.trajectories.add(trajectory_id=f"t{i}", group_id=f"g{i // 8}")
        trajectory.steps.extend(pb.Step(state=f"state {i} {k} you are in a room with a lamp",
                                        reward=1.0) for k in range(1000))
    largest_raw = largest.SerializeToString()
    empty_raw = b"\x12\x00" * 4_000_000
    empty_json = b'{"trajectories":[' + b",".join([b"{}"] * 8_000_000) + b"]}"
    strings_json = json.dumps({"trajectories": [{"steps": [
        {"state": 'x\\"y {[' * 6_500_000}]}]}).encode()

    rows = [
        ("gRPC, largest accepted (200 x 1,000 steps)", len(largest_raw),
         seconds(lambda: check_wire_counts(largest_raw, Request, limits)),
         seconds(lambda: Request.FromString(largest_raw))),
        ("gRPC, 4M empty trajectories", len(empty_raw),
         seconds(lambda: check_wire_counts(empty_raw, Request, limits)),
         seconds(lambda: Request.FromString(empty_raw))),
        ("REST, 8M empty trajectories", len(empty_json),
         seconds(lambda: check_json_counts(empty_json, Request, limits)), None),
        ("REST, one state of braces and escapes", len(strings_json),
         seconds(lambda: check_json_counts(strings_json, Request, limits)), None),
    ]
    print("| request | MB | count s | parse s (what the count spares or lets through) |")
    print("|---|---|---|---|")
    for name, size, count_s, parse_s in rows:
        parse = f"{parse_s:.2f}" if parse_s is not None else "not measured"
        print(f"| {name} | {size / 1e6:.1f} | {count_s:.2f} | {parse} |")


if __name__ == "__main__":
    main()
