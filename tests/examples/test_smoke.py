"""A short run of the example (one seed, a few iterations) against a real server: the whole
loop (TextWorld rollouts -> ComputeAdvantages over gRPC -> PPO update -> CSV/PNG/table).

About 25 s on a quiet 2-core machine with the two ProxMO variants (server start with the CPU
encoder included; measured before hgpo and graphgpo joined the run, which add their own
iterations but no second server start: 162 s for all four on a machine loaded 8x over its 2
cores). The subprocess budget is far larger because the cores are shared with other test runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

from .conftest import EXAMPLES_DIR, REDIS_URL

# ProxMO over both similarities, and verl-agent's HGPO and GraphGPO in the same harness.
ESTIMATORS = ("proxmo-tfidf", "proxmo-encoder", "hgpo", "graphgpo")
ITERATIONS = 3
GAMES = 2
ROLLOUTS = 4


def _run(python: Path, *args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run([str(python), "-m", "textworld_agent", *args], cwd=EXAMPLES_DIR,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_smoke_run_trains_through_the_service(examples_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run(
        examples_python, "--estimators", ",".join(ESTIMATORS), "--seeds", "0",
        "--iterations", str(ITERATIONS), "--game-seeds", "1,2", "--rollouts", str(ROLLOUTS),
        "--max-steps", "10", "--workers", "1", "--redis-url", REDIS_URL, "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["estimator"] for r in rows}) == sorted(ESTIMATORS)
    for name in ESTIMATORS:
        run = sorted((r for r in rows if r["estimator"] == name), key=lambda r: int(r["iteration"]))
        assert [int(r["iteration"]) for r in run] == list(range(ITERATIONS))
        previous = 0
        for r in run:
            steps = int(r["env_steps"])
            # Every environment step of the iteration came back from the service with an
            # advantage (one row per step), and episodes respect the step limit.
            assert int(r["rows_advantaged"]) == steps - previous
            assert GAMES * ROLLOUTS <= steps - previous <= GAMES * ROLLOUTS * 10
            previous = steps
            assert 0.0 <= float(r["success_rate"]) <= 1.0
            assert float(r["adv_abs_mean"]) >= 0.0
            assert float(r["service_s"]) > 0.0

    assert (out / "success_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert all(f"| {name} | 1 | {ITERATIONS} |" in table for name in ESTIMATORS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["machine"]["nproc"] >= 1 and meta["config"]["iterations"] == ITERATIONS
    assert meta["estimators"]["hgpo"]["preset"] == "hgpo"
    assert meta["estimators"]["graphgpo"]["preset"] == "graphgpo"
    # The server it started used the real Redis store and saw ENCODER requests.
    log = (out / "server.log").read_text()
    assert "redis" in log.lower()


def test_unknown_estimator_is_a_clear_error(examples_python: Path, tmp_path: Path) -> None:
    done = _run(examples_python, "--estimators", "proxmo,nope", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "--estimators: unknown ['proxmo', 'nope']" in done.stderr
