"""Episode level: group statistics, success rates and PSC weights (docs/algorithm.md section 2).

Every reduction is a segment reduction (np.bincount) over group indices: no per-group Python
loop, no group x group matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proxmo.core.batch import StepBatch, ValidationError
from proxmo.core.config import (
    EstimatorConfig,
    Normalization,
    StatsUnit,
    SuccessRateSource,
)

STD_EPSILON = 1e-6


def segment_mean_std(
    values: np.ndarray, segments: np.ndarray, n_segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment g: mu_g = mean, sigma_g = unbiased std (ddof = 1), two-pass.

    A segment with a single value uses mu = 0, sigma = 1 (verl's convention: the normalized
    value is the raw value). Every segment must be non-empty.
    """
    counts = np.bincount(segments, minlength=n_segments).astype(np.float64)
    mu = np.bincount(segments, weights=values, minlength=n_segments) / counts
    centered = values - mu[segments]
    squares = np.bincount(segments, weights=centered * centered, minlength=n_segments)
    single = counts <= 1.0
    sigma = np.sqrt(squares / np.where(single, 1.0, counts - 1.0))
    return np.where(single, 0.0, mu), np.where(single, 1.0, sigma)


def normalize_in_segments(
    values: np.ndarray, segments: np.ndarray, n_segments: int, normalization: Normalization
) -> np.ndarray:
    """MEAN: x - mu_g; MEAN_STD: (x - mu_g) / (sigma_g + 1e-6) (see segment_mean_std)."""
    mu, sigma = segment_mean_std(values, segments, n_segments)
    centered: np.ndarray = values - mu[segments]
    if normalization is Normalization.MEAN:
        return centered
    scaled: np.ndarray = centered / (sigma[segments] + STD_EPSILON)
    return scaled


def leave_one_out(values: np.ndarray, segments: np.ndarray, n_segments: int) -> np.ndarray:
    """RLOO baseline: x_i - mean of the other values of its segment = n/(n-1) * (x_i - mean).

    A segment with a single value keeps x_i (verl's convention).
    """
    counts = np.bincount(segments, minlength=n_segments).astype(np.float64)
    mean = np.bincount(segments, weights=values, minlength=n_segments) / counts
    n = counts[segments]
    scaled = n / np.maximum(n - 1.0, 1.0) * (values - mean[segments])
    return np.where(n > 1.0, scaled, values)


def episode_returns(batch: StepBatch) -> np.ndarray:
    """R_i = sum_t r_t, float64[n_traj]."""
    return np.bincount(batch.row_traj, weights=batch.rewards, minlength=batch.n_traj)


def row_scores(batch: StepBatch, cfg: EstimatorConfig) -> np.ndarray:
    """Per step row: R_i - lambda * v_t (the STEP unit's value and ROW_MEAN's score)."""
    scores: np.ndarray = episode_returns(batch)[batch.row_traj]
    return scores - cfg.invalid_action_penalty * batch.invalid


def trajectory_success(batch: StepBatch, cfg: EstimatorConfig) -> np.ndarray:
    """y_i, bool[n_traj]: the given flag, else R_i > success_threshold."""
    by_return = episode_returns(batch) > cfg.success_threshold
    return np.where(batch.success >= 0, batch.success == 1, by_return)


def batch_success_counts(batch: StepBatch, cfg: EstimatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(successes, trials) per group, int64[n_groups]: successful trajectories and trajectories."""
    y = trajectory_success(batch, cfg)
    successes = np.bincount(batch.traj_group, weights=y, minlength=batch.n_groups)
    trials = np.bincount(batch.traj_group, minlength=batch.n_groups)
    return successes.astype(np.int64), trials.astype(np.int64)


def psc_weights(p: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """PSC weights for success rate p:

    w+ = 1 + beta * (sigmoid((1 - p)^alpha) - 1/2)   (successes, amplified when p is low)
    w- = 1 + beta * (sigmoid(-(p^alpha)) - 1/2)      (failures, attenuated when p is high)
    """
    p = np.asarray(p, dtype=np.float64)
    w_plus = 1.0 + beta * (_sigmoid((1.0 - p) ** alpha) - 0.5)
    w_minus = 1.0 + beta * (_sigmoid(-(p**alpha)) - 0.5)
    return w_plus, w_minus


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


@dataclass(frozen=True)
class EpisodeTerm:
    """The episode-level component and its per-group diagnostics."""

    values: np.ndarray  # float64[n_rows]: w * A^E
    num_successes: np.ndarray  # int64[n_groups]: trajectories with y_i = 1
    success_rate: np.ndarray  # float64[n_groups]: p used (BATCH p when PSC is off)
    success_rate_source: tuple[SuccessRateSource, ...]  # [n_groups]
    weight_success: np.ndarray  # float64[n_groups]: w+ (1 when PSC is off)
    weight_failure: np.ndarray  # float64[n_groups]: w- (1 when PSC is off)


def episode_base(batch: StepBatch, cfg: EstimatorConfig, *, loo: bool) -> np.ndarray:
    """A^E per row before PSC, over cfg.stats_unit.

    Values x: TRAJECTORY unit, R_i per trajectory; STEP unit, the row score R_i - lambda*v_t
    per row. Grouped by group: `loo` gives RLOO's x - mean(others), else
    cfg.episode_normalization (MEAN: x - mu; MEAN_STD: (x - mu) / (sigma + 1e-6)).
    """
    if cfg.stats_unit is StatsUnit.TRAJECTORY:
        values, segments = episode_returns(batch), batch.traj_group
    else:
        values, segments = row_scores(batch, cfg), batch.row_group
    if loo:
        base = leave_one_out(values, segments, batch.n_groups)
    else:
        base = normalize_in_segments(values, segments, batch.n_groups, cfg.episode_normalization)
    return base[batch.row_traj] if cfg.stats_unit is StatsUnit.TRAJECTORY else base


def episode_term(
    batch: StepBatch,
    cfg: EstimatorConfig,
    base: np.ndarray,
    *,
    apply_psc: bool,
    group_success_rate: np.ndarray | None,
) -> EpisodeTerm:
    """Apply PSC (when `apply_psc`) to the per-row base advantage: Ã^E = w * A^E.

    p per group from cfg.success_rate_source: BATCH, the fraction of successful trajectories;
    ROW_MEAN, clip(mu_g, 0, 1) with mu_g the mean of the group's row scores, 0 for a group of
    a single row (segment_mean_std's convention, as the released code), and a row a success
    iff its score > 0.5 (the released code); HISTORY, `group_success_rate` (BATCH when it is
    None). With BATCH and HISTORY every row of trajectory i takes y_i. Weights from
    psc_weights().
    """
    successes, trials = batch_success_counts(batch, cfg)
    batch_p = successes / trials
    n_groups = batch.n_groups
    if not apply_psc:
        ones = np.ones(n_groups)
        return EpisodeTerm(
            base, successes, batch_p, (SuccessRateSource.BATCH,) * n_groups, ones, ones.copy()
        )
    source = cfg.success_rate_source
    row_group = batch.row_group
    if source is SuccessRateSource.ROW_MEAN:
        scores = row_scores(batch, cfg)
        mu = segment_mean_std(scores, row_group, n_groups)[0]  # 0 for a single-row group
        p = np.clip(mu, 0.0, 1.0)
        row_success = scores > 0.5
    else:
        if source is SuccessRateSource.HISTORY and group_success_rate is not None:
            p = _checked_rates(group_success_rate, n_groups)
        else:
            source = SuccessRateSource.BATCH
            p = batch_p
        row_success = trajectory_success(batch, cfg)[batch.row_traj]
    w_plus, w_minus = psc_weights(p, cfg.psc_alpha, cfg.psc_beta)
    weights = np.where(row_success, w_plus[row_group], w_minus[row_group])
    return EpisodeTerm(base * weights, successes, p, (source,) * n_groups, w_plus, w_minus)


def _checked_rates(rates: np.ndarray, n_groups: int) -> np.ndarray:
    p = np.asarray(rates, dtype=np.float64)
    if p.shape != (n_groups,):
        raise ValidationError("group_success_rate", f"must have shape ({n_groups},), got {p.shape}")
    bad = np.flatnonzero(~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0)))
    if bad.size:
        g = int(bad[0])
        raise ValidationError(f"group_success_rate[{g}]", f"must be in [0, 1], got {p[g]}")
    return p
