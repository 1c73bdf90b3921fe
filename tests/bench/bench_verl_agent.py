"""Benchmark: HGPO and GraphGPO in the core, beside a row-by-row Python implementation.

Run: .venv/bin/python tests/bench/bench_verl_agent.py [--repeats N] [--groups 16,64]

Workload: tests/bench/workload.py `alfworld_like_batch` (16 and 64 groups x 8 rollouts x <= 50
steps). For the `hgpo` and `graphgpo` presets (and variants), the estimator column times
compute_advantages on a built batch, the core column StepBatch.from_trajectories (validation,
the same for every estimator) plus compute_advantages. The row-loop column is the
authors' approach, written here in float64: a dict of history keys built by a Python loop over
every row and key length, per-key statistics, a per-row weighted mean (HGPO); a per-group dict
graph, a breadth-first search from success over reversed edges, per-row returns and dict-grouped
anchor and episode statistics (GraphGPO). Each row-loop result is checked against the core
(1e-9). Prints a markdown table of CPU times: median ms of the estimator and of the core (rounds
interleave the cases), rows/s of the core, row-loop ms (median of 3), row-loop / estimator, and
the estimator's 64/16 time scaling.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model  # noqa: E402
from proxmo.core import (  # noqa: E402
    EstimatorConfig,
    StepBatch,
    TrajectoryInput,
    compute_advantages,
    resolve_config,
)
from workload import alfworld_like_batch  # noqa: E402

CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("hgpo", "hgpo", {}),
    ("hgpo K=4, base group", "hgpo", {"hgpo_history_length": 4, "hgpo_base_group": True}),
    ("graphgpo", "graphgpo", {}),
    ("graphgpo, normalized distance", "graphgpo", {"graph_normalize_distance": True}),
)


def core(trajs: list[TrajectoryInput], cfg: EstimatorConfig) -> np.ndarray:
    return compute_advantages(StepBatch.from_trajectories(trajs), cfg).advantages


# --- the row-by-row implementations ----------------------------------------------------------


def _returns(
    rewards: list[float], invalid: list[bool], gamma: float, penalty: float
) -> list[float]:
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running - penalty * invalid[t]
    return out


def _stats(values: list[float], *, ddof: int, exact_ties: bool = False) -> tuple[float, float]:
    """Mean and std; with `exact_ties` equal values have exactly their value as mean (HGPO)."""
    tied = exact_ties and min(values) == max(values)
    mean = values[0] if tied else sum(values) / len(values)
    if len(values) - ddof <= 0:
        return mean, 1.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - ddof))


def _scores(trajs: list[TrajectoryInput], penalty: float) -> list[float]:
    return [sum(t.rewards) - penalty * bad for t in trajs for bad in t.invalid]


def _normalized_by_group(
    trajs: list[TrajectoryInput], values: list[float], std: bool
) -> list[float]:
    """GiGPO's episode value: per group mean / unbiased std of the rows (mu 0, sigma 1 alone)."""
    groups: dict[str, list[int]] = defaultdict(list)
    rows = [t.group_id for t in trajs for _ in t.states]
    for r, g in enumerate(rows):
        groups[g].append(r)
    out = [0.0] * len(values)
    for members in groups.values():
        xs = [values[r] for r in members]
        mean, sigma = (0.0, 1.0) if len(xs) == 1 else _stats(xs, ddof=1)
        for r in members:
            out[r] = (values[r] - mean) / (sigma + 1e-6) if std else values[r] - mean
    return out


def hgpo_rows(trajs: list[TrajectoryInput], cfg: EstimatorConfig) -> np.ndarray:
    std = cfg.step_normalization.value == "MEAN_STD"
    returns = [g for t in trajs for g in _returns(
        list(t.rewards), list(t.invalid), cfg.gamma, cfg.invalid_action_penalty)]  # fmt: skip
    base = _normalized_by_group(trajs, _scores(trajs, cfg.invalid_action_penalty), std)
    keys: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    row_keys: list[list[tuple[int, tuple[Any, ...]]]] = []
    for t in trajs:
        for step in range(len(t.states)):
            mine = []
            for k in range(1, min(cfg.hgpo_history_length + 1, step + 1) + 1):
                key = (t.group_id, k, tuple(t.states[step - k + 1 : step + 1]))
                keys[key].append(len(row_keys))
                mine.append((k, key))
            row_keys.append(mine)
    values: dict[tuple[tuple[Any, ...], int], float] = {}
    for key, members in keys.items():
        if len(members) < 2:
            continue
        mean, sigma = _stats([returns[r] for r in members], ddof=0, exact_ties=True)
        for r in members:
            values[(key, r)] = (returns[r] - mean) / (sigma + 1e-6) if std else returns[r] - mean
    out = np.zeros(len(row_keys))
    for r, mine in enumerate(row_keys):
        items = [(0, base[r])] if cfg.hgpo_base_group else []
        items += [(k, values[(key, r)]) for k, key in mine if (key, r) in values]
        items = [(k, v) for k, v in items if v != 0.0]
        weights = [(k + 1) ** cfg.hgpo_alpha for k, _ in items]
        total = sum(weights) + 1e-6
        out[r] = sum(w * v for w, (_, v) in zip(weights, items, strict=True)) / total
    return out


def graphgpo_rows(trajs: list[TrajectoryInput], cfg: EstimatorConfig) -> np.ndarray:
    std_step = cfg.step_normalization.value == "MEAN_STD"
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        by_group[t.group_id].append(i)
    returns: list[float] = [0.0] * sum(len(t.states) for t in trajs)
    offsets = np.concatenate([[0], np.cumsum([len(t.states) for t in trajs])]).tolist()
    for members in by_group.values():
        reverse: dict[Any, list[Any]] = defaultdict(list)
        for i in members:
            t = trajs[i]
            success = sum(t.rewards) > cfg.success_threshold
            for step, state in enumerate(t.states):
                following: Any = t.states[step + 1] if step + 1 < len(t.states) else (
                    ("SUCCESS",) if success else ("dead end", i))
                reverse[following].append(state)
        distance: dict[Any, int] = {("SUCCESS",): 0}
        queue = deque([("SUCCESS",)])
        while queue:
            node = queue.popleft()
            for source in reverse[node]:
                if source not in distance:
                    distance[source] = distance[node] + 1
                    queue.append(source)
        unreachable = max(distance.values()) + 1
        for i in members:
            t = trajs[i]
            success = sum(t.rewards) > cfg.success_threshold
            for step, state in enumerate(t.states):
                following = t.states[step + 1] if step + 1 < len(t.states) else (
                    ("SUCCESS",) if success else ("dead end", i))
                d_next = distance.get(following, unreachable)
                d_state = distance.get(state, unreachable)
                power = d_next - d_state + 1 if cfg.graph_normalize_distance else d_next
                returns[offsets[i] + step] = (
                    cfg.graph_success_value * cfg.gamma**power
                    - cfg.invalid_action_penalty * t.invalid[step]
                )
    anchors: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        for step, state in enumerate(t.states):
            anchors[(t.group_id, state)].append(offsets[i] + step)
    step_term = [0.0] * len(returns)
    for rows in anchors.values():
        if len(rows) < 2:
            continue
        mean, sigma = _stats([returns[r] for r in rows], ddof=1)
        for r in rows:
            step_term[r] = (returns[r] - mean) / (sigma + 1e-6) if std_step else returns[r] - mean
    episode = _normalized_by_group(
        trajs, _scores(trajs, cfg.invalid_action_penalty),
        cfg.episode_normalization.value == "MEAN_STD",
    )  # fmt: skip
    return cfg.episode_weight * np.array(episode) + cfg.step_weight * np.array(step_term)


# --- measurement -----------------------------------------------------------------------------


def timed_ms(fn: Callable[[], object]) -> float:
    """CPU milliseconds of fn(): everything here runs on one thread, so on a shared, busy
    machine its CPU time is what its wall time would be on a quiet one."""
    gc.collect()
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--groups", default="16,64")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; numpy {np.__version__}")
    print("| case | groups | rows | estimator ms | core ms | core rows/s | row-loop ms "
          "| row-loop/estimator |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], float] = {}
    for n_groups in (int(g) for g in args.groups.split(",")):
        trajs = alfworld_like_batch(n_groups)
        batch = StepBatch.from_trajectories(trajs)
        rows = batch.n_rows
        cases = []
        for name, preset, overrides in CASES:
            cfg = resolve_config(preset, overrides)
            loop = hgpo_rows if preset == "hgpo" else graphgpo_rows
            expected = loop(trajs, cfg)
            got = core(trajs, cfg)
            worst = float(np.abs(got - expected).max())
            assert worst <= 1e-9, f"{name}: core and row loop differ by {worst}"
            cases.append((name, cfg, loop))
        times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        full: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(args.repeats):  # rounds interleave the cases
            for name, cfg, _ in cases:
                times[name].append(timed_ms(partial(compute_advantages, batch, cfg)))
                full[name].append(timed_ms(partial(core, trajs, cfg)))
        for name, cfg, loop in cases:
            median = statistics.median(times[name])
            whole = statistics.median(full[name])
            medians[(name, n_groups)] = median
            loop_ms = statistics.median(timed_ms(partial(loop, trajs, cfg)) for _ in range(3))
            print(f"| {name} | {n_groups} | {rows:,} | {median:.1f} | {whole:.1f} "
                  f"| {rows / whole * 1e3:,.0f} | {loop_ms:,.0f} | {loop_ms / median:.0f}x |")
    sizes = sorted({g for _, g in medians})
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        for name, _, _ in CASES:
            ratio = medians[(name, high)] / medians[(name, low)]
            print(f"{name}: {high} vs {low} groups: estimator time x{ratio:.1f}")


if __name__ == "__main__":
    main()
