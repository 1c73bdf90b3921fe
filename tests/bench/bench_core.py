"""Benchmark: the estimator core on ALFWorld-like batches, beside a naive dense implementation.

Run: .venv/bin/python tests/bench/bench_core.py [--repeats N] [--naive-repeats N]

For 16 and 64 groups (8 rollouts, up to 50 steps) and every preset, times the whole core path
(StepBatch.from_trajectories, TF-IDF features when the preset uses them, compute_advantages)
and, in the same run, a naive dense implementation written here: the released code's approach,
batch x batch matrices (discount matrix for the returns, same-group masks for the statistics,
the masked batch x batch similarity softmax for PSA, pairwise state equality for GiGPO). The
naive path computes its n x n matrices in blocks of rows so that 64 groups fit in memory; its
time is still O(n^2). Each naive result is checked against the core (1e-6).

Prints a markdown table: median ms (rounds interleave the presets), rows/s, naive ms (median
of 3 at 16 groups, one run at 64: it takes seconds), ratio naive/core, and peak memory
(tracemalloc, measured in a separate untimed run), then the 64/16 scaling of the core's time
and memory.
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
from workload import alfworld_like_batch  # noqa: E402

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
    gc.collect()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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


@dataclass
class Case:
    preset: str
    core: Callable[[], np.ndarray]
    naive: Callable[[], np.ndarray]
    core_mem: float = 0.0
    naive_mem: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="core rounds (median)")
    parser.add_argument(
        "--naive-repeats", type=int, default=3, help="naive rounds at 16 groups (1 above)"
    )
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()

    print(f"cpu cores available: {len(os.sched_getaffinity(0))}; numpy {np.__version__}")
    print()
    print(
        "| preset | groups | rows | core ms (median) | rows/s | naive dense ms | naive/core "
        "| core peak MiB | naive peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, int], tuple[float, float]] = {}
    for n_groups in args.groups:
        trajs = alfworld_like_batch(n_groups=n_groups, rollouts=8, max_steps=50, seed=0)
        n_rows = sum(len(t.states) for t in trajs)
        cases = []
        for preset in PRESETS:
            cfg = resolve_config(preset, default_similarity=Similarity.TFIDF)
            case = Case(
                preset, partial(core_pipeline, trajs, cfg), partial(naive_dense, trajs, cfg)
            )
            # one untimed run each under tracemalloc: peak memory and the equality check
            ours, case.core_mem = traced(case.core)
            naive, case.naive_mem = traced(case.naive)
            gap = float(np.max(np.abs(ours - naive)))
            if gap > 1e-6:
                raise SystemExit(f"{preset} @ {n_groups} groups: core and naive differ by {gap}")
            cases.append(case)
        # rounds interleave the presets, so drifting load on a shared machine hits all alike
        core_ms: dict[str, list[float]] = {c.preset: [] for c in cases}
        naive_ms: dict[str, list[float]] = {c.preset: [] for c in cases}
        for _ in range(args.repeats):
            for case in cases:
                core_ms[case.preset].append(timed_ms(case.core))
        for _ in range(args.naive_repeats if n_groups <= 16 else 1):
            for case in cases:
                naive_ms[case.preset].append(timed_ms(case.naive))
        for case in cases:
            core = statistics.median(core_ms[case.preset])
            naive = statistics.median(naive_ms[case.preset])
            summary[(case.preset, n_groups)] = (core, case.core_mem)
            print(
                f"| {case.preset} | {n_groups} | {n_rows} | {core:.1f} | "
                f"{n_rows / core * 1e3:,.0f} | {naive:.0f} | {naive / core:.0f}x | "
                f"{case.core_mem:.1f} | {case.naive_mem:.0f} |",
                flush=True,
            )
    if len(args.groups) == 2:
        small, large = args.groups
        print()
        print(f"scaling {small} -> {large} groups ({large / small:.0f}x the groups), core only:")
        for preset in PRESETS:
            (t0, m0), (t1, m1) = summary[(preset, small)], summary[(preset, large)]
            print(f"- {preset}: time x{t1 / t0:.1f}, peak memory x{m1 / m0:.1f}")


if __name__ == "__main__":
    main()
