"""Side-by-side comparison: every (estimator, seed) run on the same games, seeds and budget.

    python -m textworld_agent --estimators proxmo-tfidf,grpo --seeds 0,1,2 --out results/

Starts one proxmo-server (CPU encoder, so TFIDF and ENCODER both work) unless ``--server`` names
one, runs the jobs over ``--workers`` processes with a progress bar, and writes runs.csv,
success_vs_steps.png, table.md and meta.json under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import report
from .games import DEFAULT_GAMES_DIR, GameSpec, ensure_game
from .server import ProxmoServer
from .train import ESTIMATORS, TrainConfig

EMBED_CACHE = DEFAULT_GAMES_DIR.parent / "embeddings.npz"

# Per worker process: built once by _init_worker, reused by every job of that worker.
_worker: dict[str, Any] = {}


class _BarProgress:
    """In-process stand-in for the progress queue: ticks the bar directly."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def put(self, n: int) -> None:
        self._bar.update(n)


def _init_worker(target: str, progress: Any, run_token: str) -> None:
    import torch
    from proxmo_client import ProxmoClient

    from .policy import TextEmbedder

    torch.set_num_threads(1)  # one core per run: parallelism comes from --workers
    _worker["client"] = ProxmoClient(target)
    # Each worker writes its own cache file; this invocation merges its own files at the end.
    save_path = EMBED_CACHE.with_suffix(f".{run_token}.{os.getpid()}.npz")
    _worker["embedder"] = TextEmbedder(EMBED_CACHE, save_path)
    _worker["progress"] = progress


def _run_job(name: str, seed: int, paths: list[str], config: TrainConfig) -> list[dict[str, Any]]:
    from .train import train_run

    embedder = _worker["embedder"]
    records = train_run(
        ESTIMATORS[name], seed, [Path(p) for p in paths],
        client=_worker["client"], embedder=embedder, config=config,
        on_iteration=lambda _record: _worker["progress"].put(1),
    )  # fmt: skip
    embedder.save()
    return records


def _merge_embedding_caches(run_token: str) -> None:
    """Fold the per-worker caches into one file, so the next run embeds nothing it has seen."""
    import numpy as np

    parts = sorted(EMBED_CACHE.parent.glob(f"embeddings.{run_token}.*.npz"))
    if not parts:
        return
    merged: dict[str, Any] = {}
    for path in ([EMBED_CACHE] if EMBED_CACHE.exists() else []) + parts:
        with np.load(path) as data:
            merged.update(zip(data["keys"].tolist(), data["vectors"], strict=True))
    tmp = EMBED_CACHE.with_name(EMBED_CACHE.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, keys=np.array(list(merged)), vectors=np.stack(list(merged.values())))
    tmp.replace(EMBED_CACHE)
    for path in parts:
        path.unlink()


def _write_partial(records: list[dict[str, Any]], out: Path) -> None:
    """runs.csv after every finished run, so a long comparison cut short keeps what it did."""
    report.write_csv(sorted(records, key=_record_order), out / "runs.csv")


def _record_order(record: dict[str, Any]) -> tuple[str, int, int]:
    return (record["estimator"], record["seed"], record["iteration"])


def _run_pool(
    jobs: list[tuple[str, int]], paths: list[str], config: TrainConfig,
    args: argparse.Namespace, target: str, run_token: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """The jobs over ``args.workers`` spawned processes; the bar ticks once per iteration."""
    records: list[dict[str, Any]] = []
    ctx = get_context("spawn")
    with ctx.Manager() as manager:
        progress = manager.Queue()
        with ProcessPoolExecutor(
            max_workers=min(args.workers, len(jobs)), mp_context=ctx,
            initializer=_init_worker, initargs=(target, progress, run_token),
        ) as pool:  # fmt: skip
            futures = [pool.submit(_run_job, n, s, paths, config) for n, s in jobs]
            with tqdm(total=len(jobs) * config.iterations, unit="it", desc="training",
                      disable=args.no_progress) as bar:  # fmt: skip
                pending = set(futures)
                while pending:
                    try:
                        bar.update(progress.get(timeout=0.5))
                    except queue.Empty:
                        pass
                    for done in [f for f in pending if f.done()]:
                        pending.discard(done)
                        records.extend(done.result())  # re-raises a failed run's error
                        _write_partial(records, args.out)
    return records


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version()}  # fmt: skip


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m textworld_agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"comma list of {', '.join(ESTIMATORS)}")  # fmt: skip
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="run seeds, e.g. 0,1,2")
    p.add_argument("--game-seeds", type=_int_list, default=[1, 2, 3],
                   help="TextWorld generation seeds, one game (task) each")  # fmt: skip
    p.add_argument("--quest-length", type=int, default=3)
    p.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    p.add_argument("--rollouts", type=int, default=TrainConfig.rollouts)
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--workers", type=int, default=2, help="parallel runs (processes)")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--server", default="", help="host:port of a running server (else start one)")
    p.add_argument("--redis-url", default="", help="success-rate store of the started server")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = [n for n in args.estimators.split(",") if n not in ESTIMATORS]
    if unknown:
        p.error(f"--estimators: unknown {unknown}; choose from {list(ESTIMATORS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.estimators.split(",")
    config = TrainConfig(iterations=args.iterations, rollouts=args.rollouts,
                         max_steps=args.max_steps, lr=args.lr)  # fmt: skip
    started = time.time()
    paths = [str(ensure_game(GameSpec(seed=s, quest_length=args.quest_length)))
             for s in args.game_seeds]  # fmt: skip
    server = None
    if not args.server:
        server = ProxmoServer(args.out / "server.log", redis_url=args.redis_url,
                              namespace=f"proxmo-examples-{time.time_ns()}")  # fmt: skip
        server.__enter__()
    target = args.server or (server.target if server else "")
    # Seeds outer, estimators inner: partial results stay balanced across estimators.
    jobs = [(name, seed) for seed in args.seeds for name in names]
    records: list[dict[str, Any]] = []
    run_token = str(time.time_ns())
    total = len(jobs) * config.iterations
    try:
        if args.workers <= 1:  # in-process: no worker start-up (the smoke run)
            with tqdm(total=total, unit="it", desc="training", disable=args.no_progress) as bar:
                _init_worker(target, _BarProgress(bar), run_token)
                for name, seed in jobs:
                    records.extend(_run_job(name, seed, paths, config))
                    _write_partial(records, args.out)
        else:
            records = _run_pool(jobs, paths, config, args, target, run_token)
    finally:
        if server is not None:
            server.stop()
        _merge_embedding_caches(run_token)
    records.sort(key=_record_order)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(records, args.out / "runs.csv")
    rows = report.read_csv(args.out / "runs.csv")
    (args.out / "table.md").write_text(report.markdown_table(rows))
    report.plot(rows, args.out / "success_vs_steps.png",
                title=f"TextWorld, {len(paths)} games x {config.rollouts} rollouts/iteration, "
                      f"{len(args.seeds)} seeds")  # fmt: skip
    meta = {
        "command": shlex.join([Path(sys.executable).name, "-m", "textworld_agent",
                               *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(),
        "wall_s": round(time.time() - started, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(config),
        "games": [Path(p).stem for p in paths],
        "estimators": {n: {"preset": ESTIMATORS[n].preset, **ESTIMATORS[n].overrides}
                       for n in names},
        "seeds": args.seeds,
        "git_sha": _git_sha(),
    }  # fmt: skip
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(report.markdown_table(rows))
    return 0


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
