"""The estimators (docs/algorithm.md section 4), their registry and compute_advantages().

Every estimator computes per row the return G_t, the episode term A^E before PSC and the step
term A^S (its Components: nothing there depends on the success rate p); combine() then applies
PSC and gives A_{i,t} = Ã^E_{i,t} + omega * A^S_{i,t} with per-group diagnostics. The split lets
the engine check that a result will be finite before it writes a HISTORY update.

| estimator | episode term                                   | step term                  |
|-----------|------------------------------------------------|----------------------------|
| PROXMO    | normalized over stats_unit, PSC when enabled   | PSA (or exact, tau -> 0)   |
| GIGPO     | normalized over stats_unit, PSC when enabled   | exact anchors, step_norm.  |
| GRPO      | normalized over stats_unit (preset MEAN_STD)    | none                       |
| RLOO      | x - mean of the others in the group            | none                       |
| HGPO      | none (optionally inside the step term)         | history-keyed groups       |
| GRAPHGPO  | normalized over stats_unit, no PSC             | graph-distance returns,    |
|           |                                                | exact anchors              |

A = episode_weight * Ã^E + omega * A^S for every estimator (episode_weight defaults to 1).
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
from proxmo.core.episode import (
    EpisodeTerm,
    episode_base,
    episode_term,
    normalize_in_segments,
    row_scores,
    trajectory_success,
)
from proxmo.core.graph import graph_returns
from proxmo.core.hgpo import history_key_advantages
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
    """Per-group diagnostics (docs/algorithm.md section 5), arrays of length n_groups."""

    num_trajectories: np.ndarray  # int64
    num_steps: np.ndarray  # int64
    num_successes: np.ndarray  # int64
    success_rate: np.ndarray  # float64: p used (BATCH p when PSC is off)
    success_rate_source: tuple[SuccessRateSource, ...]
    weight_success: np.ndarray  # float64: w+ (1 when PSC is off)
    weight_failure: np.ndarray  # float64: w- (1 when PSC is off)
    singleton_fraction: np.ndarray  # float64: rows whose exact anchor group has one member
    mean_effective_neighbors: np.ndarray  # float64: mean of 1/sum_j W_ij^2 (0: no step term)
    hgpo_long_history_fraction: np.ndarray  # float64: HGPO rows using a key with k >= 2 (else 0)
    graph_mean_distance: np.ndarray  # float64: GraphGPO mean d over states reaching success
    graph_unreachable_fraction: np.ndarray  # float64: GraphGPO states not reaching success


@dataclass(frozen=True)
class AdvantageResult:
    """Per-row results (float64[n_rows], request order) and per-group diagnostics."""

    advantages: np.ndarray  # episode + omega * step
    episode_advantages: np.ndarray  # Ã^E
    step_advantages: np.ndarray  # A^S, before omega
    returns: np.ndarray  # G_t after the invalid-action penalty
    groups: GroupDiagnostics


@dataclass(frozen=True)
class Components:
    """What an estimator computes before PSC (float64[n_rows] each): nothing depends on p."""

    returns: np.ndarray  # G_t after the invalid-action penalty
    episode_base: np.ndarray  # A^E before PSC
    step_advantages: np.ndarray  # A^S, before omega
    effective_neighbors: np.ndarray  # 1 / sum_j W_ij^2 (anchor size for exact; 0: none)
    # Only HGPO / GraphGPO set these (their GroupReport diagnostics); None reads as 0.
    long_history: np.ndarray | None = None  # bool[n_rows]: an HGPO item with k >= 2
    graph_mean_distance: np.ndarray | None = None  # float64[n_groups]
    graph_unreachable_fraction: np.ndarray | None = None  # float64[n_groups]


class EstimatorFn(Protocol):
    def __call__(
        self, batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
    ) -> Components: ...


def _result(
    batch: StepBatch,
    cfg: EstimatorConfig,
    returns: np.ndarray,
    episode: EpisodeTerm,
    step: np.ndarray,
    effective_neighbors: np.ndarray,
    *,
    long_history: np.ndarray | None = None,
    graph_mean_distance: np.ndarray | None = None,
    graph_unreachable_fraction: np.ndarray | None = None,
) -> AdvantageResult:
    group = batch.row_group
    num_steps = np.bincount(group, minlength=batch.n_groups)
    zeros = np.zeros(batch.n_groups)
    long_history_rows = np.zeros(batch.n_rows) if long_history is None else long_history
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
        hgpo_long_history_fraction=np.bincount(
            group, weights=long_history_rows, minlength=batch.n_groups
        )
        / num_steps,
        graph_mean_distance=zeros if graph_mean_distance is None else graph_mean_distance,
        graph_unreachable_fraction=(
            zeros if graph_unreachable_fraction is None else graph_unreachable_fraction
        ),
    )
    return AdvantageResult(
        advantages=cfg.episode_weight * episode.values + cfg.step_weight * step,
        episode_advantages=episode.values,
        step_advantages=step,
        returns=returns,
        groups=diagnostics,
    )


def proxmo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """ProxMO: A^E normalized (PSC, when enabled, in combine) and A^S = G - B from PSA.

    Similarity EXACT is PSA's tau -> 0 limit: A^S = G - mean of the exact anchor group, and the
    effective neighbours are the anchor sizes. Otherwise `features` drive PSA; None means
    A^S = 0 (e.g. an empty TF-IDF vocabulary) with 0 effective neighbours.
    """
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=False)
    if cfg.similarity is Similarity.EXACT:
        anchors = anchor_ids(batch, cfg.scope)
        step, effective = exact_anchor_advantages(returns, anchors, Normalization.MEAN)
    elif features is None:
        step, effective = np.zeros(batch.n_rows), np.zeros(batch.n_rows)
    else:
        step, effective = soft_aggregation(returns, batch, features, cfg.tau, cfg.scope)
    return Components(returns, base, step, effective)


def gigpo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """GiGPO: normalized episode term (PSC when enabled) plus exact anchors normalized by
    cfg.step_normalization (MEAN: G - mean; MEAN_STD: (G - mean) / (std + 1e-6), std = 1 for a
    single row; a singleton anchor gets 0). Anchors: same group, identical state key, plus the
    same step index under SAME_STEP. `features` are not used."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = episode_base(batch, cfg, loo=False)
    anchors = anchor_ids(batch, cfg.scope)
    step, effective = exact_anchor_advantages(returns, anchors, cfg.step_normalization)
    return Components(returns, base, step, effective)


def grpo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """GRPO: A = (x - mu_g) / (sigma_g + 1e-6) (cfg.episode_normalization over cfg.stats_unit;
    a single value keeps x), no PSC, step term 0. Returns are still reported."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    zeros = np.zeros(batch.n_rows)
    return Components(returns, episode_base(batch, cfg, loo=False), zeros, zeros)


def rloo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """RLOO: A = x_i - mean of the other values of the group = n/(n-1) (x_i - mean); a lone
    value keeps x_i (verl). x over cfg.stats_unit (preset: R_i per trajectory). No PSC, no step
    term, normalization ignored. Returns are still reported."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    zeros = np.zeros(batch.n_rows)
    return Components(returns, episode_base(batch, cfg, loo=True), zeros, zeros)


def hgpo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """HGPO (verl-agent recipe/hgpo): the step term is the weighted mean over the row's history
    keys k = 1 .. K + 1 (K = hgpo_history_length) of its value in each key, G - mu or
    (G - mu) / (sigma + 1e-6) by cfg.step_normalization with sigma the population std, weights
    (k + 1)^hgpo_alpha over the items that are not exactly 0 (see proxmo.core.hgpo). No
    episode term: with hgpo_base_group the row's GiGPO episode value (STEP unit, row score
    R_i - lambda*v_t, the same normalization, unbiased std, mu 0 / sigma 1 for a single row)
    joins the step term's items with k = 0 and weight 1, and the reported episode component
    stays 0. Returns G as in section 1. No PSC; `features` are not used."""
    returns = discounted_returns(batch, cfg.gamma, cfg.invalid_action_penalty)
    base = None
    if cfg.hgpo_base_group:
        base = normalize_in_segments(
            row_scores(batch, cfg), batch.row_group, batch.n_groups, cfg.step_normalization
        )
    history = history_key_advantages(
        returns,
        batch,
        history_length=cfg.hgpo_history_length,
        alpha=cfg.hgpo_alpha,
        normalization=cfg.step_normalization,
        base=base,
    )
    return Components(
        returns,
        np.zeros(batch.n_rows),
        history.values,
        history.anchor_size,
        long_history=history.long_history,
    )


def graphgpo(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None
) -> Components:
    """GraphGPO (verl-agent recipe/GraphGPO): returns from the distance to success on each
    group's state graph, G = graph_success_value * gamma^d(next) (or gamma^(d(next) - d(s) + 1)
    with graph_normalize_distance), minus lambda * v_t (see proxmo.core.graph); step term: exact
    anchors over those returns by cfg.step_normalization (unbiased std, singletons 0); episode
    term: GiGPO's over cfg.stats_unit, no PSC. A = episode_weight * episode + omega * step.
    Rewards enter only through each trajectory's success."""
    graph = graph_returns(
        batch,
        trajectory_success(batch, cfg),
        gamma=cfg.gamma,
        success_value=cfg.graph_success_value,
        normalize_distance=cfg.graph_normalize_distance,
        invalid_action_penalty=cfg.invalid_action_penalty,
    )
    anchors = anchor_ids(batch, cfg.scope)
    step, effective = exact_anchor_advantages(graph.returns, anchors, cfg.step_normalization)
    return Components(
        graph.returns,
        episode_base(batch, cfg, loo=False),
        step,
        effective,
        graph_mean_distance=graph.mean_distance,
        graph_unreachable_fraction=graph.unreachable_fraction,
    )


ESTIMATORS: Mapping[Estimator, EstimatorFn] = MappingProxyType(
    {
        Estimator.PROXMO: proxmo,
        Estimator.GIGPO: gigpo,
        Estimator.GRPO: grpo,
        Estimator.RLOO: rloo,
        Estimator.HGPO: hgpo,
        Estimator.GRAPHGPO: graphgpo,
    }
)


def compute_components(
    batch: StepBatch, cfg: EstimatorConfig, *, features: StateFeatures | None = None
) -> Components:
    """Run cfg.estimator on a validated batch up to PSC (see Components).

    `features`: PSA's state features for PROXMO with TFIDF / ENCODER / PRECOMPUTED similarity
    (see config.required_features; None means A^S = 0).
    """
    return ESTIMATORS[cfg.estimator](batch, cfg, features=features)


def combine(
    batch: StepBatch,
    cfg: EstimatorConfig,
    components: Components,
    *,
    group_success_rate: np.ndarray | None = None,
) -> AdvantageResult:
    """PSC and the combination: Ã^E = w * A^E (when cfg.applies_psc), A = Ã^E + omega * A^S.

    `group_success_rate`: p per group from HISTORY (see config.uses_history); None makes
    HISTORY fall back to BATCH. Each weight is within 1 +- psc_beta * 0.2310585786300049 for
    every p in [0, 1], so A is finite whenever max_weight * |A^E| + omega * |A^S| is.
    """
    episode = episode_term(
        batch, cfg, components.episode_base, apply_psc=cfg.applies_psc,
        group_success_rate=group_success_rate,
    )
    return _result(batch, cfg, components.returns, episode, components.step_advantages,
                   components.effective_neighbors, long_history=components.long_history,
                   graph_mean_distance=components.graph_mean_distance,
                   graph_unreachable_fraction=components.graph_unreachable_fraction)


def compute_advantages(
    batch: StepBatch,
    cfg: EstimatorConfig,
    *,
    features: StateFeatures | None = None,
    group_success_rate: np.ndarray | None = None,
) -> AdvantageResult:
    """Run cfg.estimator on a validated batch: combine(compute_components(...)).

    Pure: raises (ValidationError for a bad group_success_rate) before anything is returned.
    """
    components = compute_components(batch, cfg, features=features)
    return combine(batch, cfg, components, group_success_rate=group_success_rate)
