"""The estimators (ALGORITHM.md section 4), their registry and compute_advantages().

Every estimator returns per row A_{i,t} = Ã^E_{i,t} + omega * A^S_{i,t}, the two components
(A^S before omega) and the return G_t, plus per-group diagnostics.

| estimator | episode term                                   | step term                  |
|-----------|------------------------------------------------|----------------------------|
| PROXMO    | normalized over stats_unit, PSC when enabled   | PSA (or exact, tau -> 0)   |
| GIGPO     | normalized over stats_unit, PSC when enabled   | exact anchors, step_norm.  |
| GRPO      | normalized over stats_unit (preset MEAN_STD)    | none                       |
| RLOO      | x - mean of the others in the group            | none                       |

PSC applies to PROXMO and GIGPO when psc_enabled is set (config.PSC_ESTIMATORS); GRPO and RLOO
are verl's estimators and ignore it. Only PROXMO reads `similarity`, `tau` and features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np

from proxmo.core.batch import StepBatch
from proxmo.core.config import (
    Estimator,
    EstimatorConfig,
    Normalization,
    Similarity,
    SuccessRateSource,
)
from proxmo.core.episode import EpisodeTerm, episode_base, episode_term
from proxmo.core.returns import discounted_returns
from proxmo.core.step import (
    StateFeatures,
    anchor_ids,
    exact_anchor_advantages,
    singleton_fraction,
    soft_aggregation,
)


@dataclass(frozen=True)
class GroupDiagnostics:
    """Per-group diagnostics (ALGORITHM.md section 5), arrays of length n_groups."""

    num_trajectories: np.ndarray  # int64
    num_steps: np.ndarray  # int64
    num_successes: np.ndarray  # int64
    success_rate: np.ndarray  # float64: p used (BATCH p when PSC is off)
    success_rate_source: tuple[SuccessRateSource, ...]
    weight_success: np.ndarray  # float64: w+ (1 when PSC is off)
    weight_failure: np.ndarray  # float64: w- (1 when PSC is off)
    singleton_fraction: np.ndarray  # float64: rows whose exact anchor group has one member
    mean_effective_neighbors: np.ndarray  # float64: mean of 1/sum_j W_ij^2 (0: no step term)


@dataclass(frozen=True)
class AdvantageResult:
    """Per-row results (float64[n_rows], request order) and per-group diagnostics."""

    advantages: np.ndarray  # episode + omega * step
    episode_advantages: np.ndarray  # Ã^E
    step_advantages: np.ndarray  # A^S, before omega
    returns: np.ndarray  # G_t after the invalid-action penalty
    groups: GroupDiagnostics


class EstimatorFn(Protocol):
    def __call__(
        self,
        batch: StepBatch,
        cfg: EstimatorConfig,
        *,
        features: StateFeatures | None,
        group_success_rate: np.ndarray | None,
    ) -> AdvantageResult: ...


def _result(
    batch: StepBatch,
    cfg: EstimatorConfig,
    returns: np.ndarray,
    episode: EpisodeTerm,
    step: np.ndarray,
    effective_neighbors: np.ndarray,
) -> AdvantageResult:
    group = batch.row_group
    num_steps = np.bincount(group, minlength=batch.n_groups)
    diagnostics = GroupDiagnostics(
        num_trajectories=np.bincount(batch.traj_group, minlength=batch.n_groups),
        num_steps=num_steps,
        num_successes=episode.num_successes,
        success_rate=episode.success_rate,
        success_rate_source=episode.success_rate_source,
        weight_success=episode.weight_success,
        weight_failure=episode.weight_failure,
        singleton_fraction=singleton_fraction(batch),
        mean_effective_neighbors=np.bincount(
            group, weights=effective_neighbors, minlength=batch.n_groups
        )
        / num_steps,
    )
    return AdvantageResult(
        advantages=episode.values + cfg.step_weight * step,
        episode_advantages=episode.values,
        step_advantages=step,
        returns=returns,
        groups=diagnostics,
    )


def proxmo(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None,
    group_success_rate: np.ndarray | None,
) -> AdvantageResult:
    """ProxMO: Ã^E = w * A^E (PSC when enabled) and A^S = G - B from PSA.

    Similarity EXACT is PSA's tau -> 0 limit: A^S = G - mean of the exact anchor group, and the
    effective neighbours are the anchor sizes. Otherwise `features` drive PSA; None means
    A^S = 0 (e.g. an empty TF-IDF vocabulary) with 0 effective neighbours.
    """
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=False)
    episode = episode_term(
        batch, cfg, base, apply_psc=cfg.applies_psc, group_success_rate=group_success_rate
    )
    if cfg.similarity is Similarity.EXACT:
        anchors = anchor_ids(batch, cfg.scope)
        step, effective = exact_anchor_advantages(returns, anchors, Normalization.MEAN)
    elif features is None:
        step, effective = np.zeros(batch.n_rows), np.zeros(batch.n_rows)
    else:
        step, effective = soft_aggregation(returns, batch, features, cfg.tau, cfg.scope)
    return _result(batch, cfg, returns, episode, step, effective)


def gigpo(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None,
    group_success_rate: np.ndarray | None,
) -> AdvantageResult:
    """GiGPO: normalized episode term (PSC when enabled) plus exact anchors normalized by
    cfg.step_normalization (MEAN: G - mean; MEAN_STD: (G - mean) / (std + 1e-6), std = 1 for a
    single row; a singleton anchor gets 0). Anchors: same group, identical state key, plus the
    same step index under SAME_STEP. `features` are not used."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=False)
    episode = episode_term(
        batch, cfg, base, apply_psc=cfg.applies_psc, group_success_rate=group_success_rate
    )
    anchors = anchor_ids(batch, cfg.scope)
    step, effective = exact_anchor_advantages(returns, anchors, cfg.step_normalization)
    return _result(batch, cfg, returns, episode, step, effective)


def grpo(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None,
    group_success_rate: np.ndarray | None,
) -> AdvantageResult:
    """GRPO: A = (x - mu_g) / (sigma_g + 1e-6) (cfg.episode_normalization over cfg.stats_unit;
    a single value keeps x), no PSC, step term 0. Returns are still reported."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=False)
    episode = episode_term(batch, cfg, base, apply_psc=False, group_success_rate=None)
    zeros = np.zeros(batch.n_rows)
    return _result(batch, cfg, returns, episode, zeros, zeros)


def rloo(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None,
    group_success_rate: np.ndarray | None,
) -> AdvantageResult:
    """RLOO: A = x_i - mean of the other values of the group = n/(n-1) (x_i - mean); a lone
    value keeps x_i (verl). x over cfg.stats_unit (preset: R_i per trajectory). No PSC, no step
    term, normalization ignored. Returns are still reported."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=True)
    episode = episode_term(batch, cfg, base, apply_psc=False, group_success_rate=None)
    zeros = np.zeros(batch.n_rows)
    return _result(batch, cfg, returns, episode, zeros, zeros)


ESTIMATORS: Mapping[Estimator, EstimatorFn] = MappingProxyType(
    {
        Estimator.PROXMO: proxmo,
        Estimator.GIGPO: gigpo,
        Estimator.GRPO: grpo,
        Estimator.RLOO: rloo,
    }
)


def compute_advantages(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None = None,
    group_success_rate: np.ndarray | None = None,
) -> AdvantageResult:
    """Run cfg.estimator on a validated batch.

    `features`: PSA's state features for PROXMO with TFIDF / ENCODER / PRECOMPUTED similarity
    (see config.required_features; None means A^S = 0). `group_success_rate`: p per group from
    HISTORY (see config.uses_history); None makes HISTORY fall back to BATCH. Pure: raises
    (ValidationError for a bad group_success_rate) before anything is returned.
    """
    return ESTIMATORS[cfg.estimator](
        batch, cfg, features=features, group_success_rate=group_success_rate
    )
