"""Benchmark: the estimator core on ALFWorld-like batches, beside a naive dense implementation.

Run: .venv/bin/python tests/bench/bench_core.py [--repeats N] [--naive-repeats N] [--groups ...]
     [--naive-groups ...]

Two workloads (tests/bench/workload.py): the ALFWorld-like batch (~36 % of rows distinct
states) for every preset, and a half-distinct one (over half of the rows distinct states: 16 x
8 x 50 gives 5,254 rows, 3,156 distinct texts) for the presets that run PSA. For 16 and 64
groups each, times the whole core path (StepBatch.from_trajectories, TF-IDF features when the
preset uses them, compute_advantages) and, in the same run, a naive dense implementation
written here: the released ProxMO code's approach and its stand-in, batch x batch matrices
(discount matrix for the returns, same-group masks for the statistics, TfidfVectorizer on every
row and the masked batch x batch similarity softmax for PSA, pairwise state equality for
GiGPO). The naive path computes its n x n matrices in blocks of rows so that 64 groups fit in
memory; its time is still O(n^2). It is vectorized numpy throughout, where the released code
loops over rows in Python for the returns and the episode term, so naive/core understates the
gain over the released code. Each naive result is checked against the core (1e-6); presets it
does not implement (hgpo, graphgpo) are timed for the core only.

Prints a markdown table: median ms (rounds interleave the presets), rows/s, naive ms (median
of 3 at 16 groups, one run at 64: it takes seconds), ratio naive/core, and peak memory
(tracemalloc, measured in a separate untimed run), then the 64/16 scaling of the core's time
and memory, the performance target (paper preset, half-distinct, 16 groups: <= 30 ms, >= 25x the
naive path) and where the paper preset's time goes.
The `proxmo` preset runs with TFIDF (the encoder is not part of the core) and with fixed
HISTORY rates standing in for the store's answer.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model  # noqa: E402
from proxmo.core import (  # noqa: E402
    PRESETS,
    EstimatorConfig,
    Similarity,
    StepBatch,
    TrajectoryInput,
    compute_advantages,
    required_features,
    resolve_config,
    tfidf_features,
    uses_history,
)
from proxmo.core.returns import discounted_returns  # noqa: E402
from proxmo.core.step import soft_aggregation  # noqa: E402
from workload import FRESH_FRACTION, HALF_DISTINCT_FRESH, alfworld_like_batch  # noqa: E402

BLOCK_ROWS = 2048
HISTORY_RATE = 0.5


def core_pipeline(trajs: list[TrajectoryInput], cfg: EstimatorConfig) -> np.ndarray:
    """What the engine runs (minus protobuf and the store): validate, featurize, estimate."""
    batch = StepBatch.from_trajectories(trajs)
    features = tfidf_features(batch) if required_features(cfg) is Similarity.TFIDF else None
    rates = np.full(batch.n_groups, HISTORY_RATE) if uses_history(cfg) else None
    result = compute_advantages(batch, cfg, features=features, group_success_rate=rates)
    return result.advantages


# --- the naive dense baseline -----------------------------------------------------------------


@dataclass
class Rows:
    rewards: np.ndarray
    invalid: np.ndarray
    traj: np.ndarray
    t: np.ndarray
    group: np.ndarray
    states: list[str]


def _flatten(trajs: list[TrajectoryInput]) -> Rows:
    groups: dict[str, int] = {}
    rewards: list[float] = []
    invalid: list[bool] = []
    traj: list[int] = []
    steps: list[int] = []
    group: list[int] = []
    states: list[str] = []
    for i, tr in enumerate(trajs):
        g = groups.setdefault(tr.group_id, len(groups))
        for t, (s, r, v) in enumerate(zip(tr.states, tr.rewards, tr.invalid, strict=True)):
            rewards.append(r)
            invalid.append(v)
            traj.append(i)
            steps.append(t)
            group.append(g)
            states.append(s)
    return Rows(
        np.array(rewards),
        np.array(invalid),
        np.array(traj),
        np.array(steps),
        np.array(group),
        states,
    )


def _blocks(n: int) -> list[slice]:
    return [slice(lo, min(lo + BLOCK_ROWS, n)) for lo in range(0, n, BLOCK_ROWS)]


def _masked_mean_std(
    mask_for: Callable[[slice], np.ndarray], x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row i: count, mean and unbiased std of x over the columns j where mask[i, j].

    mask_for(block) gives the dense bool rows of the n x n mask for a block of rows.
    """
    n = x.shape[0]
    count, mean, std = np.empty(n), np.empty(n), np.empty(n)
    for b in _blocks(n):
        m = mask_for(b).astype(np.float64)
        count[b] = m.sum(axis=1)
        mean[b] = (m @ x) / count[b]
        square = m @ (x * x) - 2 * mean[b] * (m @ x) + count[b] * mean[b] ** 2
        std[b] = np.sqrt(np.maximum(square, 0.0) / np.maximum(count[b] - 1, 1))
    return count, mean, std


def _same(keys: np.ndarray) -> Callable[[slice], np.ndarray]:
    return lambda b: keys[b, None] == keys[None, :]


def naive_dense(trajs: list[TrajectoryInput], cfg: EstimatorConfig) -> np.ndarray:
    rows = _flatten(trajs)
    n = rows.rewards.shape[0]
    # returns: G = D r, D_ij = gamma^(t_j - t_i) for j in i's trajectory at or after t_i
    returns = np.empty(n)
    for b in _blocks(n):
        lag = rows.t[None, :] - rows.t[b, None]
        mask = (rows.traj[None, :] == rows.traj[b, None]) & (lag >= 0)
        returns[b] = np.where(mask, cfg.gamma ** np.maximum(lag, 0), 0.0) @ rows.rewards
    returns -= cfg.invalid_action_penalty * rows.invalid
    big_r = np.zeros(len(trajs))
    np.add.at(big_r, rows.traj, rows.rewards)
    score = big_r[rows.traj] - cfg.invalid_action_penalty * rows.invalid
    success = big_r[rows.traj] > cfg.success_threshold
    traj_group = rows.group[np.unique(rows.traj, return_index=True)[1]]

    # episode term over same-group masks (rows x rows, or trajectories x trajectories)
    if cfg.stats_unit.value == "STEP":
        unit_values, unit_group, to_row = score, rows.group, np.arange(n)
    else:
        unit_values, unit_group, to_row = big_r, traj_group, rows.traj
    count, mean, std = _masked_mean_std(_same(unit_group), unit_values)
    single = count == 1
    if cfg.estimator.value == "RLOO":
        unit_adv = np.where(
            single, unit_values, count / np.maximum(count - 1, 1) * (unit_values - mean)
        )
    else:
        mean, std = np.where(single, 0.0, mean), np.where(single, 1.0, std)
        unit_adv = unit_values - mean
        if cfg.episode_normalization.value == "MEAN_STD":
            unit_adv = unit_adv / (std + 1e-6)
    episode = unit_adv[to_row]
    if cfg.psc_enabled and cfg.estimator.value in ("PROXMO", "GIGPO"):
        if cfg.success_rate_source.value == "ROW_MEAN":
            p = np.clip(_masked_mean_std(_same(rows.group), score)[1], 0, 1)
            ok = score > 0.5
        elif cfg.success_rate_source.value == "HISTORY":
            p = np.full(n, HISTORY_RATE)
            ok = success
        else:
            traj_success = (big_r > cfg.success_threshold).astype(np.float64)
            p = _masked_mean_std(_same(traj_group), traj_success)[1][rows.traj]
            ok = success
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        w_plus = 1 + cfg.psc_beta * (sig((1 - p) ** cfg.psc_alpha) - 0.5)
        w_minus = 1 + cfg.psc_beta * (sig(-(p**cfg.psc_alpha)) - 0.5)
        episode = episode * np.where(ok, w_plus, w_minus)

    # step term
    step = np.zeros(n)
    if cfg.estimator.value == "PROXMO" and cfg.similarity.value == "TFIDF":
        x = TfidfVectorizer(max_features=1024).fit_transform(rows.states).toarray()
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
        for b in _blocks(n):
            logits = np.where(
                rows.group[None, :] == rows.group[b, None], x[b] @ x.T / cfg.tau, -np.inf
            )
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            step[b] = returns[b] - w @ returns
    elif cfg.estimator.value == "GIGPO":
        codes = np.unique(np.array(rows.states, dtype=object), return_inverse=True)[1].reshape(-1)
        anchor_key = rows.group * (int(codes.max()) + 1) + codes
        count, mean, std = _masked_mean_std(_same(anchor_key), returns)
        centered = returns - mean
        if cfg.step_normalization.value == "MEAN_STD":
            centered = centered / (np.where(count > 1, std, 1.0) + 1e-6)
        step = np.where(count > 1, centered, 0.0)
    return episode + cfg.step_weight * step


# --- measurement -----------------------------------------------------------------------------


def timed_ms(fn: Callable[[], object]) -> float:
    return timed(fn)[0]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU milliseconds of fn(). The core runs on one thread, so on a shared, busy
    machine its CPU time is what its wall time would be on a quiet one."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def traced(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """fn's result and its peak traced allocation in MiB."""
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak / 2**20


NAIVE_ESTIMATORS = frozenset({"PROXMO", "GIGPO", "GRPO", "RLOO"})  # what naive_dense implements
# (workload, fresh_fraction, presets): the ALFWorld-like batch for every preset, and the
# half-distinct batch (over half of the rows distinct states) for the presets that run PSA.
WORKLOADS = (
    ("alfworld", FRESH_FRACTION, tuple(PRESETS)),
    ("half-distinct", HALF_DISTINCT_FRESH, ("proxmo", "paper", "proxmo-rl")),
)
PAPER_TARGET_MS = 30.0  # the paper preset on the 16-group half-distinct batch
RATIO_GOAL = 25.0


@dataclass
class Case:
    preset: str
    core: Callable[[], np.ndarray]
    naive: Callable[[], np.ndarray] | None
    core_mem: float = 0.0
    naive_mem: float = 0.0


def _cases(
    trajs: list[TrajectoryInput], presets: tuple[str, ...], label: str, with_naive: bool
) -> list[Case]:
    cases = []
    for preset in presets:
        cfg = resolve_config(preset, default_similarity=Similarity.TFIDF)
        naive = (
            partial(naive_dense, trajs, cfg)
            if with_naive and cfg.estimator.value in NAIVE_ESTIMATORS
            else None
        )
        case = Case(preset, partial(core_pipeline, trajs, cfg), naive)
        # one untimed run each under tracemalloc: peak memory and the equality check
        ours, case.core_mem = traced(case.core)
        if case.naive is not None:
            reference, case.naive_mem = traced(case.naive)
            gap = float(np.max(np.abs(ours - reference)))
            if gap > 1e-6:
                raise SystemExit(f"{preset} @ {label}: core and naive differ by {gap}")
        cases.append(case)
    return cases


def paper_stages(trajs: list[TrajectoryInput], repeats: int) -> None:
    """Where the paper preset's time goes on one batch, PSA per group included."""
    cfg = resolve_config("paper", default_similarity=Similarity.TFIDF)
    batch = StepBatch.from_trajectories(trajs)
    features = tfidf_features(batch)
    assert features is not None
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    stages: dict[str, Callable[[], object]] = {
        "validate (StepBatch)": partial(StepBatch.from_trajectories, trajs),
        "TF-IDF features": partial(tfidf_features, batch),
        "estimator (compute_advantages)": partial(
            compute_advantages, batch, cfg, features=features
        ),
        "of which PSA (soft_aggregation)": partial(
            soft_aggregation, returns, batch, features, cfg.tau, cfg.scope
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            times[name].append(timed_ms(fn))
    units = np.unique(batch.row_group * features.matrix.shape[0] + features.row_index)
    per_group = np.bincount(units // features.matrix.shape[0], minlength=batch.n_groups)
    print()
    print(
        f"paper preset, stages (median of {repeats}), {batch.n_groups} groups, "
        f"{batch.n_rows} rows, {len(batch.states)} distinct texts, {units.size} distinct "
        f"states per group summed (largest group {per_group.max()}), "
        f"{int((per_group**2).sum()):,} similarity entries:"
    )
    for name, values in times.items():
        print(f"- {name}: {statistics.median(values):.2f} ms")
    psa = statistics.median(times["of which PSA (soft_aggregation)"])
    print(f"- PSA per group: {psa / batch.n_groups * 1e3:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="core rounds (median)")
    parser.add_argument(
        "--naive-repeats", type=int, default=3, help="naive rounds at 16 groups (1 above)"
    )
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--naive-groups",
        type=int,
        nargs="*",
        default=None,
        help="group counts where the naive path runs too (default: every one)",
    )
    args = parser.parse_args()

    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores available; numpy {np.__version__}")
    print()
    print(
        "| workload | preset | groups | rows | distinct texts | core ms (median) | core CPU ms "
        "| rows/s | naive dense ms | naive/core | core peak MiB | naive peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, str, int], tuple[float, float, float | None, float]] = {}
    for workload, fresh, presets in WORKLOADS:
        for n_groups in args.groups:
            trajs = alfworld_like_batch(
                n_groups=n_groups, rollouts=8, max_steps=50, seed=0, fresh_fraction=fresh
            )
            n_rows = sum(len(t.states) for t in trajs)
            n_texts = len(StepBatch.from_trajectories(trajs).states)
            with_naive = args.naive_groups is None or n_groups in args.naive_groups
            cases = _cases(trajs, presets, f"{workload} x {n_groups}", with_naive)
            # rounds interleave the presets, so drifting load on a shared machine hits all alike
            core_ms: dict[str, list[float]] = {c.preset: [] for c in cases}
            core_cpu: dict[str, list[float]] = {c.preset: [] for c in cases}
            naive_ms: dict[str, list[float]] = {c.preset: [] for c in cases}
            for _ in range(args.repeats):
                for case in cases:
                    wall, cpu = timed(case.core)
                    core_ms[case.preset].append(wall)
                    core_cpu[case.preset].append(cpu)
            for _ in range(args.naive_repeats if n_groups <= 16 else 1):
                for case in cases:
                    if case.naive is not None:
                        naive_ms[case.preset].append(timed_ms(case.naive))
            for case in cases:
                core = statistics.median(core_ms[case.preset])
                cpu = statistics.median(core_cpu[case.preset])
                naive = statistics.median(naive_ms[case.preset]) if case.naive else None
                summary[(workload, case.preset, n_groups)] = (core, case.core_mem, naive, cpu)
                naive_cells = (
                    f"{naive:.0f} | {naive / core:.0f}x | {case.core_mem:.1f} | "
                    f"{case.naive_mem:.0f}"
                    if naive is not None
                    else f"n/a | | {case.core_mem:.1f} |"
                )
                print(
                    f"| {workload} | {case.preset} | {n_groups} | {n_rows:,} | {n_texts:,} | "
                    f"{core:.1f} | {cpu:.1f} | {n_rows / core * 1e3:,.0f} | {naive_cells} |",
                    flush=True,
                )
    if len(args.groups) == 2:
        small, large = args.groups
        print()
        print(f"scaling {small} -> {large} groups ({large / small:.0f}x the groups), core only:")
        for workload, _, presets in WORKLOADS:
            for preset in presets:
                t0, m0, _, c0 = summary[(workload, preset, small)]
                t1, m1, _, c1 = summary[(workload, preset, large)]
                print(
                    f"- {workload} {preset}: time x{t1 / t0:.1f} (CPU x{c1 / c0:.1f}), "
                    f"peak memory x{m1 / m0:.1f}"
                )
    if 16 in args.groups:
        core, _, naive, cpu = summary[("half-distinct", "paper", 16)]
        ratio = (
            f"naive/core {naive / core:.0f}x (>= {RATIO_GOAL:.0f}x: "
            f"{'met' if naive / core >= RATIO_GOAL else 'MISSED'})"
            if naive is not None
            else "naive path not run"
        )
        print()
        print(
            f"target: paper, half-distinct, 16 groups: {core:.1f} ms, "
            f"{cpu:.1f} ms CPU (<= {PAPER_TARGET_MS:.0f} ms: "
            f"{'met' if core <= PAPER_TARGET_MS else 'MISSED'}); {ratio}"
        )
        paper_stages(
            alfworld_like_batch(16, 8, 50, seed=0, fresh_fraction=HALF_DISTINCT_FRESH),
            args.repeats,
        )


if __name__ == "__main__":
    main()
