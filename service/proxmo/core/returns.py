"""Discounted step returns (reward-to-go) with the invalid-action penalty."""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from proxmo.core.batch import StepBatch


def discounted_returns(batch: StepBatch, gamma: float, invalid_action_penalty: float) -> np.ndarray:
    """G_t = sum_{k>=t} gamma^(k-t) r_k, then G_t -= lambda * v_t (that step only).

    The penalty is applied after discounting, so it is not propagated to earlier steps.
    Vectorized over trajectories: rewards are laid out time-reversed in a zero-padded
    (n_traj, T_max) matrix and the exact float64 recursion y[n] = x[n] + gamma * y[n-1] runs
    along axis 1 (scipy.signal.lfilter); trailing padding cannot reach earlier outputs.
    Memory is n_traj * T_max floats. Returns float64[n_rows].
    """
    lengths = batch.traj_lengths
    reversed_col = lengths[batch.row_traj] - 1 - batch.row_t
    padded = np.zeros((batch.n_traj, int(lengths.max())), dtype=np.float64)
    padded[batch.row_traj, reversed_col] = batch.rewards
    filtered = np.asarray(lfilter([1.0], [1.0, -gamma], padded, axis=1), dtype=np.float64)
    returns: np.ndarray = filtered[batch.row_traj, reversed_col]
    return returns - invalid_action_penalty * batch.invalid
