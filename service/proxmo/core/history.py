"""HISTORY success rates: pure math behind the success-rate stores (docs/algorithm.md section 2).

A task's history is (S, N): exponentially decayed successes and trials, decayed once per update
of the task. One batch is one update: S_b and N_b sum the task's groups in that batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from proxmo.core.batch import StepBatch, ValidationError
from proxmo.core.config import EstimatorConfig
from proxmo.core.episode import batch_success_counts


def decay(half_life: float) -> float:
    """rho = 0.5 ** (1 / half_life): the weight of the past per update (half_life in updates)."""
    if half_life <= 0.0:
        raise ValidationError("config.history_half_life", f"must be > 0, got {half_life}")
    return float(0.5 ** (1.0 / half_life))


def success_rate(decayed_successes: float, decayed_trials: float, prior: float) -> float:
    """p = (S + a) / (N + a + b) with a = b = prior; NaN when N and the prior are both 0."""
    denominator = decayed_trials + 2.0 * prior
    if denominator <= 0.0:
        return float("nan")
    return (decayed_successes + prior) / denominator


def apply_update(
    previous: tuple[float, float] | None,
    successes: float,
    trials: float,
    *,
    rho: float,
    prior: float,
) -> tuple[float, float, float]:
    """One update of a task's history with rho = decay(half_life); returns (S', N', p).

    S' = rho * S + S_b, N' = rho * N + N_b, p = (S' + a) / (N' + a + b) with a = b = prior.
    A task with no history (`previous` None) has S = N = 0: S' = S_b, N' = N_b and its first
    p = (S_b + a) / (N_b + a + b), the batch estimate S_b / N_b when the prior is 0 and shrunk
    toward 1/2 by a prior > 0. The Redis store's Lua script performs the same float operations
    in the same order.
    """
    if previous is None:
        previous = (0.0, 0.0)  # rho * 0 + S_b is exactly S_b: no special case for the math
    s_new = rho * previous[0] + successes
    n_new = rho * previous[1] + trials
    return s_new, n_new, (s_new + prior) / (n_new + 2.0 * prior)


def task_batch_counts(
    batch: StepBatch, cfg: EstimatorConfig
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Distinct task ids in first-appearance order, with successes and trajectories per task
    (summed over the task's groups in this batch), both int64. What the engine feeds a store."""
    group_successes, group_trials = batch_success_counts(batch, cfg)
    task_ids: list[str] = list(dict.fromkeys(batch.group_task))
    position = {task: k for k, task in enumerate(task_ids)}
    group_to_task = np.asarray([position[t] for t in batch.group_task], dtype=np.int64)
    successes = np.bincount(group_to_task, weights=group_successes, minlength=len(task_ids))
    trials = np.bincount(group_to_task, weights=group_trials, minlength=len(task_ids))
    return task_ids, successes.astype(np.int64), trials.astype(np.int64)


def group_success_rates(batch: StepBatch, task_rates: Mapping[str, float]) -> np.ndarray:
    """p per group (float64[n_groups]) from p per task, for compute_advantages' argument.

    Raises KeyError for a task missing from `task_rates`.
    """
    return np.asarray([task_rates[task] for task in batch.group_task], dtype=np.float64)
