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
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import report, stats
from .games import DEFAULT_GAMES_DIR, REGIMES, GameSpec, Regime, ensure_game
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


def _run_job(
    name: str, seed: int, paths: list[str], config: TrainConfig,
    regime_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    from .policy import TextEmbedder
    from .train import train_run

    kwargs = dict(regime_kwargs or {})
    # Noisy observations are nearly all distinct: embedded whole, a fresh embedder per run,
    # never saved, so neither the worker's memory nor the disk cache grows with them. Embedded
    # by sentence they recombine a bounded set of sentences, so the worker's cache serves them.
    distinct_texts = bool(kwargs.get("noisy")) and not config.state_by_sentence
    embedder = TextEmbedder(EMBED_CACHE) if distinct_texts else _worker["embedder"]
    budget = config.env_step_budget
    counted = [0]

    def tick(record: dict[str, Any]) -> None:
        """One tick per iteration, or per env step (up to the budget) with a budget."""
        if budget is None:
            _worker["progress"].put(1)
            return
        now = min(int(record["env_steps"]), budget)
        _worker["progress"].put(now - counted[0])
        counted[0] = now

    records = train_run(
        ESTIMATORS[name], seed, [Path(p) for p in paths],
        client=_worker["client"], embedder=embedder, config=config, on_iteration=tick, **kwargs,
    )  # fmt: skip
    if budget is not None:
        _worker["progress"].put(budget - counted[0])  # a run stopped by --iterations
    if not distinct_texts:
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
    # int(): rows kept from an earlier run's runs.csv (--resume) hold strings.
    return (record["estimator"], int(record["seed"]), int(record["iteration"]))


def _bar(jobs: list[tuple[str, int]], config: TrainConfig, disable: bool) -> Any:
    """The progress bar: iterations, or env steps when runs have a step budget."""
    if config.env_step_budget is None:
        return tqdm(total=len(jobs) * config.iterations, unit="it", desc="training",
                    disable=disable)  # fmt: skip
    return tqdm(total=len(jobs) * config.env_step_budget, unit="step", unit_scale=True,
                desc=f"training {len(jobs)} runs", disable=disable)  # fmt: skip


def _run_pool(
    jobs: list[tuple[str, int]], paths: list[str], config: TrainConfig,
    args: argparse.Namespace, target: str, run_token: str,
    previous: list[dict[str, Any]], regime_kwargs: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """The jobs over ``args.workers`` spawned processes, after the ``previous`` runs' rows."""
    records: list[dict[str, Any]] = list(previous)
    ctx = get_context("spawn")
    with ctx.Manager() as manager:
        progress = manager.Queue()
        with ProcessPoolExecutor(
            max_workers=min(args.workers, len(jobs)), mp_context=ctx,
            initializer=_init_worker, initargs=(target, progress, run_token),
        ) as pool:  # fmt: skip
            futures = [pool.submit(_run_job, n, s, paths, config, regime_kwargs)
                       for n, s in jobs]  # fmt: skip
            with _bar(jobs, config, args.no_progress) as bar:
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
    p.add_argument("--regime", choices=sorted(REGIMES), default="",
                   help="a declared regime (games, held-out evaluation, gentle optimizer, "
                        "env-step budget; docs/e2e.md); default: the original example")  # fmt: skip
    p.add_argument("--estimators", default="",
                   help=f"comma list of {', '.join(ESTIMATORS)} (default: all; with --regime "
                        "the declared grid)")  # fmt: skip
    p.add_argument("--stage", type=int, choices=range(1, len(stats.STAGES) + 1), default=None,
                   help="with --regime: only the grid's estimators of this stage (1 primary, "
                        "2 ablations on TF-IDF, 3 tau sweep; docs/e2e.md)")  # fmt: skip
    p.add_argument("--seeds", type=_int_list, default=None,
                   help="run seeds, e.g. 0,1,2 (default 0,1,2; with --regime 0-9)")  # fmt: skip
    p.add_argument("--game-seeds", type=_int_list, default=[1, 2, 3],
                   help="TextWorld generation seeds, one game (task) each")  # fmt: skip
    p.add_argument("--quest-length", type=int, default=3)
    p.add_argument("--iterations", type=int, default=None,
                   help=f"iterations per run (default {TrainConfig.iterations}; with --regime "
                        "a cap, the env-step budget ends the run)")  # fmt: skip
    p.add_argument("--env-steps", type=int, default=None,
                   help="env-step budget per run (with --regime; default: the regime's)")
    p.add_argument("--rollouts", type=int, default=TrainConfig.rollouts)
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default {TrainConfig.lr}; with --regime "
                        f"{REGIME_TRAINING.lr})")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="parallel runs (processes)")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--server", default="", help="host:port of a running server (else start one)")
    p.add_argument("--redis-url", default="", help="success-rate store of the started server")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep --out/runs.csv and skip its (estimator, seed) runs")  # fmt: skip
    args = p.parse_args(argv)
    if args.stage is not None and (not args.regime or args.estimators):
        p.error("--stage: only with --regime and without --estimators")
    if args.stage is not None:
        args.estimators = ",".join(stats.STAGES[args.stage - 1])
    if not args.estimators:
        args.estimators = ",".join(stats.GRID if args.regime else ESTIMATORS)
    if args.seeds is None:
        args.seeds = list(stats.SEEDS) if args.regime else [0, 1, 2]
    if args.env_steps is not None and not args.regime:
        p.error("--env-steps: only with --regime")
    unknown = [n for n in args.estimators.split(",") if n not in ESTIMATORS]
    if unknown:
        p.error(f"--estimators: unknown {unknown}; choose from {list(ESTIMATORS)}")
    return args


# The regimes' training: a gentler optimizer than the original example's (lr 3e-3, 4 epochs
# clipped 40-60 % of rows early on), entropy annealed, a fixed env-step budget per run.
# lr 1e-3 (the top of issue 18's range): at 5e-4 the first pilot's updates moved the policy by
# an approximate KL of only 1e-6 to 3e-6. 4 minibatches per epoch: 8 optimizer steps per
# iteration instead of 2 (KL 0.002-0.012 per update, clip fraction 0-0.27 in the pilots,
# docs/e2e.md), still stopped by the KL target. States embedded by sentence: the noisy
# observations then cost no encoder call per step (3.7x faster per step, docs/e2e.md).
REGIME_TRAINING = TrainConfig(iterations=1000, lr=1e-3, ppo_epochs=2, minibatches=4,
                              target_kl=0.02, entropy_coef=0.02, entropy_final=0.0,
                              state_by_sentence=True)  # fmt: skip


def _config(args: argparse.Namespace, regime: Regime | None) -> TrainConfig:
    base = TrainConfig() if regime is None else REGIME_TRAINING
    budget = None if regime is None else (args.env_steps or regime.env_step_budget)
    return replace(base, iterations=args.iterations or base.iterations, rollouts=args.rollouts,
                   max_steps=args.max_steps, lr=args.lr or base.lr,
                   env_step_budget=budget)  # fmt: skip


def _previous_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--resume: the rows of runs.csv already in --out (every run there is finished: the file
    is written only after whole runs)."""
    path = args.out / "runs.csv"
    return report.read_csv(path) if args.resume and path.exists() else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.estimators.split(",")
    regime = REGIMES[args.regime] if args.regime else None
    config = _config(args, regime)
    started = time.time()
    regime_kwargs: dict[str, Any] = {}
    if regime is None:
        specs = [GameSpec(seed=s, quest_length=args.quest_length) for s in args.game_seeds]
    else:
        specs = list(regime.train)
        regime_kwargs = {
            "eval_paths": [ensure_game(spec) for spec in regime.evaluate],
            "games_per_iteration": regime.games_per_iteration, "noisy": regime.noisy,
        }  # fmt: skip
    paths = [str(ensure_game(spec)) for spec in specs]
    # Seeds outer, estimators inner: partial results stay balanced across estimators.
    previous = _previous_runs(args)
    finished = {(r["estimator"], int(r["seed"])) for r in previous}
    jobs = [(name, seed) for seed in args.seeds for name in names if (name, seed) not in finished]
    server = None
    if not args.server and jobs:
        server = ProxmoServer(args.out / "server.log", redis_url=args.redis_url,
                              namespace=f"proxmo-examples-{time.time_ns()}")  # fmt: skip
        server.__enter__()
    target = args.server or (server.target if server else "")
    records: list[dict[str, Any]] = list(previous)
    run_token = str(time.time_ns())
    try:
        if args.workers <= 1:  # in-process: no worker start-up (the smoke run)
            with _bar(jobs, config, args.no_progress) as bar:
                _init_worker(target, _BarProgress(bar), run_token)
                for name, seed in jobs:
                    records.extend(_run_job(name, seed, paths, config, regime_kwargs))
                    _write_partial(records, args.out)
        elif jobs:
            records = _run_pool(jobs, paths, config, args, target, run_token, previous,
                                regime_kwargs)  # fmt: skip
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
        "regime": {"name": regime.name, "description": regime.description,
                   "games_per_iteration": regime.games_per_iteration, "noisy": regime.noisy,
                   "evaluate": [spec.name for spec in regime.evaluate]} if regime else None,
        "resumed_runs": len(finished),
        "estimators": {n: {"preset": ESTIMATORS[n].preset, **ESTIMATORS[n].overrides}
                       for n in names},
        "seeds": args.seeds,
        "git_sha": _git_sha(),
    }  # fmt: skip
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if regime is not None:  # the pre-declared statistics: summary.json, auc.png
        stats.analyze(args.out)
    print(report.markdown_table(rows))
    return 0


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
