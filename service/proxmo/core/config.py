"""Estimator configuration: enums, the resolved EstimatorConfig, presets and resolve_config().

A request names a preset and overrides some fields; resolve_config() turns that into one fully
resolved, validated, frozen EstimatorConfig. Every preset resolves every field, so a server can
list the presets with their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from types import MappingProxyType
from typing import Any

from proxmo.core.batch import MAX_ABS_REWARD, ValidationError, echo

# sigmoid(1) - 1/2: the largest deviation |w - 1| of a PSC weight per unit of beta.
SIGMOID_ONE_MINUS_HALF = 0.2310585786300049


def beta_from_range(psc_range: float) -> float:
    """PSC strength from a range: beta = range / (sigmoid(1) - 1/2), so w stays in 1 +- range."""
    return psc_range / SIGMOID_ONE_MINUS_HALF


# The released run scripts' "target range 0.05": weights within [0.95, 1.05]; beta = 0.216395...
DEFAULT_PSC_BETA = beta_from_range(0.05)


class Estimator(str, Enum):
    """Which estimator turns trajectories into advantages (names match the proto suffixes)."""

    PROXMO = "PROXMO"
    GIGPO = "GIGPO"
    GRPO = "GRPO"
    RLOO = "RLOO"
    HGPO = "HGPO"
    GRAPHGPO = "GRAPHGPO"


class Normalization(str, Enum):
    """MEAN: x - mu; MEAN_STD: (x - mu) / (sigma + 1e-6), sigma unbiased."""

    MEAN = "MEAN"
    MEAN_STD = "MEAN_STD"


class StatsUnit(str, Enum):
    """TRAJECTORY: one value R_i per trajectory; STEP: one row score R_i - lambda*v_t per step."""

    TRAJECTORY = "TRAJECTORY"
    STEP = "STEP"


class SuccessRateSource(str, Enum):
    """Where PSC's success rate p of a group comes from."""

    BATCH = "BATCH"
    ROW_MEAN = "ROW_MEAN"
    HISTORY = "HISTORY"


class Similarity(str, Enum):
    """State features for PSA."""

    TFIDF = "TFIDF"
    ENCODER = "ENCODER"
    EXACT = "EXACT"
    PRECOMPUTED = "PRECOMPUTED"


class Scope(str, Enum):
    """PSA candidates: GROUP = every row of the group; SAME_STEP = only rows with the same t."""

    GROUP = "GROUP"
    SAME_STEP = "SAME_STEP"


# Estimators whose episode term PSC modulates when psc_enabled is set. PSC reweighs a normalized
# group advantage, which PROXMO and GIGPO share (GIGPO + PSC is the paper's "ProxMO w/o PSA"
# ablation); GRPO and RLOO stay the classic verl estimators and ignore psc_enabled.
PSC_ESTIMATORS: frozenset[Estimator] = frozenset({Estimator.PROXMO, Estimator.GIGPO})


@dataclass(frozen=True)
class EstimatorConfig:
    """A fully resolved estimator configuration (every field set, validated)."""

    estimator: Estimator
    gamma: float
    tau: float
    step_weight: float
    psc_enabled: bool
    psc_alpha: float
    psc_beta: float
    invalid_action_penalty: float
    success_threshold: float
    episode_normalization: Normalization
    step_normalization: Normalization
    stats_unit: StatsUnit
    success_rate_source: SuccessRateSource
    similarity: Similarity
    scope: Scope
    history_half_life: float
    history_prior: float
    # HGPO and GraphGPO (docs/algorithm.md section 4a); episode_weight scales every episode term.
    hgpo_history_length: int
    hgpo_alpha: float
    hgpo_base_group: bool
    graph_normalize_distance: bool
    graph_success_value: float
    episode_weight: float
    preset: str

    @property
    def applies_psc(self) -> bool:
        """True iff PSC modulates this configuration's episode term (see PSC_ESTIMATORS)."""
        return self.psc_enabled and self.estimator in PSC_ESTIMATORS


def uses_history(cfg: EstimatorConfig) -> bool:
    """True iff the estimator applies PSC with p from the HISTORY source (the engine's store)."""
    return cfg.applies_psc and cfg.success_rate_source is SuccessRateSource.HISTORY


def required_features(cfg: EstimatorConfig) -> Similarity | None:
    """The similarity whose StateFeatures the estimator needs, or None when it needs none.

    Only PROXMO's PSA uses features; EXACT similarity (and every other estimator) works from
    the batch's state keys alone, so the engine must not run TF-IDF or the encoder for them.
    """
    if cfg.estimator is Estimator.PROXMO and cfg.similarity is not Similarity.EXACT:
        return cfg.similarity
    return None


@dataclass(frozen=True)
class PresetSpec:
    """A named configuration: what it reproduces and the fields it fixes.

    Fields a preset leaves out take BASE_VALUES; `similarity` left out means the server's
    default similarity, `tau` left out means 0.05 for ENCODER and 0.1 otherwise.
    """

    description: str
    values: Mapping[str, Any]


# Defaults shared by every preset (docs/algorithm.md sections 1-4).
BASE_VALUES: Mapping[str, Any] = MappingProxyType(
    {
        "estimator": Estimator.PROXMO,
        "gamma": 0.95,
        "step_weight": 1.0,
        "psc_enabled": False,
        "psc_alpha": 4.0,
        "psc_beta": DEFAULT_PSC_BETA,
        "invalid_action_penalty": 0.1,
        "success_threshold": 0.0,
        "episode_normalization": Normalization.MEAN_STD,
        "step_normalization": Normalization.MEAN,
        "stats_unit": StatsUnit.TRAJECTORY,
        "success_rate_source": SuccessRateSource.BATCH,
        "scope": Scope.GROUP,
        "history_half_life": 8.0,
        "history_prior": 0.0,
        "hgpo_history_length": 2,
        "hgpo_alpha": 1.0,
        "hgpo_base_group": False,
        "graph_normalize_distance": False,
        "graph_success_value": 10.0,
        "episode_weight": 1.0,
    }
)

DEFAULT_PRESET = "proxmo"
ENCODER_TAU = 0.05
DEFAULT_TAU = 0.1

PRESETS: Mapping[str, PresetSpec] = MappingProxyType(
    {
        "proxmo": PresetSpec(
            "ProxMO with persistent per-task success rates: trajectory-level z-scores, PSC with p "
            "from the decayed HISTORY, PSA over the server's default similarity (tau 0.05 with "
            "ENCODER, 0.1 otherwise).",
            {
                "estimator": Estimator.PROXMO,
                "stats_unit": StatsUnit.TRAJECTORY,
                "episode_normalization": Normalization.MEAN_STD,
                "psc_enabled": True,
                "success_rate_source": SuccessRateSource.HISTORY,
            },
        ),
        "paper": PresetSpec(
            "The ProxMO paper's formulas, reproducible anywhere: trajectory-level z-scores, PSC "
            "with the batch success rate, PSA over TF-IDF with tau 0.1.",
            {
                "estimator": Estimator.PROXMO,
                "stats_unit": StatsUnit.TRAJECTORY,
                "episode_normalization": Normalization.MEAN_STD,
                "psc_enabled": True,
                "success_rate_source": SuccessRateSource.BATCH,
                "similarity": Similarity.TFIDF,
                "tau": 0.1,
            },
        ),
        "proxmo-rl": PresetSpec(
            "The released ProxMO-RL code as run for the paper's tables: per-step statistics, "
            "mean-only, PSC with the clipped row mean, PSA over TF-IDF with tau 0.1.",
            {
                "estimator": Estimator.PROXMO,
                "stats_unit": StatsUnit.STEP,
                "episode_normalization": Normalization.MEAN,
                "step_normalization": Normalization.MEAN,
                "psc_enabled": True,
                "success_rate_source": SuccessRateSource.ROW_MEAN,
                "similarity": Similarity.TFIDF,
                "tau": 0.1,
            },
        ),
        "gigpo": PresetSpec(
            "verl-agent GiGPO: per-step statistics, mean-only at both levels, exact anchor states.",
            {
                "estimator": Estimator.GIGPO,
                "stats_unit": StatsUnit.STEP,
                "episode_normalization": Normalization.MEAN,
                "step_normalization": Normalization.MEAN,
                "similarity": Similarity.EXACT,
            },
        ),
        "grpo": PresetSpec(
            "GRPO (verl): each trajectory's return normalized by its group's mean and std; no "
            "step term.",
            {
                "estimator": Estimator.GRPO,
                "stats_unit": StatsUnit.TRAJECTORY,
                "episode_normalization": Normalization.MEAN_STD,
                "similarity": Similarity.EXACT,
            },
        ),
        "rloo": PresetSpec(
            "RLOO (verl): each trajectory's return minus the mean of the other trajectories of "
            "its group; no step term.",
            {
                "estimator": Estimator.RLOO,
                "stats_unit": StatsUnit.TRAJECTORY,
                "episode_normalization": Normalization.MEAN,
                "similarity": Similarity.EXACT,
            },
        ),
        "hgpo": PresetSpec(
            "verl-agent HGPO: each step grouped with the steps of its group that share its last "
            "k states, k = 1 .. K + 1 (K = 2), z-scored per key and averaged with weights "
            "(k + 1)^alpha (alpha 1); no episode term.",
            {
                "estimator": Estimator.HGPO,
                "gamma": 0.95,
                "stats_unit": StatsUnit.STEP,
                "episode_normalization": Normalization.MEAN_STD,
                "step_normalization": Normalization.MEAN_STD,
                "similarity": Similarity.EXACT,
                "hgpo_history_length": 2,
                "hgpo_alpha": 1.0,
                "hgpo_base_group": False,
            },
        ),
        "graphgpo": PresetSpec(
            "verl-agent GraphGPO: step returns 10 * gamma^d from each step's next state's "
            "distance d to success on the group's state graph (gamma 0.1), z-scored over exact "
            "anchors, plus GiGPO's per-step episode z-score.",
            {
                "estimator": Estimator.GRAPHGPO,
                "gamma": 0.1,
                "stats_unit": StatsUnit.STEP,
                "episode_normalization": Normalization.MEAN_STD,
                "step_normalization": Normalization.MEAN_STD,
                "similarity": Similarity.EXACT,
                "step_weight": 1.0,
                "episode_weight": 1.0,
                "graph_normalize_distance": False,
                "graph_success_value": 10.0,
            },
        ),
    }
)

_ENUM_FIELDS: Mapping[str, type[Enum]] = MappingProxyType(
    {
        "estimator": Estimator,
        "episode_normalization": Normalization,
        "step_normalization": Normalization,
        "stats_unit": StatsUnit,
        "success_rate_source": SuccessRateSource,
        "similarity": Similarity,
        "scope": Scope,
    }
)
_BOOL_FIELDS = frozenset({"psc_enabled", "hgpo_base_group", "graph_normalize_distance"})
_INT_FIELDS = frozenset({"hgpo_history_length"})
_CONFIG_FIELDS = frozenset(f.name for f in fields(EstimatorConfig)) - {"preset"}
_OVERRIDE_FIELDS = _CONFIG_FIELDS | {"psc_range"}


def _coerce(name: str, value: Any) -> Any:
    """One override value in its field's type, or ValidationError('config.<name>')."""
    where = f"config.{name}"
    enum_type = _ENUM_FIELDS.get(name)
    if enum_type is not None:
        if isinstance(value, enum_type):
            return value
        if isinstance(value, str) and value in enum_type.__members__:
            return enum_type[value]
        allowed = ", ".join(enum_type.__members__)
        raise ValidationError(where, f"unknown value {echo(value)}; expected one of {allowed}")
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        raise ValidationError(where, f"must be a boolean, got {echo(value)}")
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(where, f"must be an integer, got {echo(value)}")
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValidationError(where, f"must be an integer, got {echo(value)}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(where, f"must be a number, got {echo(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(where, f"must be finite, got {number}")
    return number


# Accepted ranges of the numeric fields (docs/algorithm.md section 5a; docs/core.md lists them).
# Every value is also finite (checked by _coerce). With these ranges and batch.MAX_ABS_REWARD
# every output is finite, whatever the batch (see batch.MAX_ABS_REWARD for the derivation):
# - psc_range <= 1 (psc_beta <= 1 / 0.2310585786300049 = 4.3279...): the PSC weights stay in
#   [1 - range, 1 + range] within [0, 2], so PSC reweighs an advantage and never flips its sign;
# - step_weight in [0, 1e6]: omega * A^S stays below 1e6 * 2 max|G|, finite by many orders;
# - invalid_action_penalty in [0, 1e15]: a penalty is on the reward scale (MAX_ABS_REWARD);
# - history_prior in [0, 1e9]: beyond 1e9 pseudo-counts p is 1/2 to 1e-9 anyway, and N + 2a
#   never overflows (an unbounded a = 1e308 would make 2a infinite and p = 0).
# tau (> 0), psc_alpha (> 0), history_half_life (> 0) and success_threshold need no upper
# bound: PSA's softmax is stable for every tau > 0, p^alpha stays in [0, 1] for every alpha > 0,
# rho = 0.5^(1/h) stays in [0, 1] for every h > 0, and a threshold is only compared.
MAX_PSC_RANGE = 1.0
MAX_PSC_BETA = MAX_PSC_RANGE / SIGMOID_ONE_MINUS_HALF
MAX_STEP_WEIGHT = 1e6
MAX_INVALID_ACTION_PENALTY = 1e15
MAX_HISTORY_PRIOR = 1e9
# HGPO and GraphGPO (section 4a):
# - hgpo_history_length K in [0, 64]: up to K + 1 levels of O(rows log rows) each (verl-agent
#   runs K = 2 or 4; K = 64 on 200k identical rows, every key shared, takes seconds);
# - hgpo_alpha in [-16, 16]: weights (k + 1)^alpha <= 66^16 ~ 1.3e29, far from overflow;
# - graph_success_value in [0, MAX_ABS_REWARD]: the returns c * gamma^d are in [0, c];
# - episode_weight in [0, 1e6], like step_weight.
MAX_HGPO_HISTORY_LENGTH = 64
MAX_ABS_HGPO_ALPHA = 16.0
MAX_GRAPH_SUCCESS_VALUE = MAX_ABS_REWARD
MAX_EPISODE_WEIGHT = MAX_STEP_WEIGHT


def _check_ranges(cfg: EstimatorConfig) -> None:
    """Range checks of a resolved configuration (each names its field; see the MAX_* above)."""
    _check_within("gamma", cfg.gamma, 0.0, 1.0)
    _check_positive("tau", cfg.tau)
    _check_positive("psc_alpha", cfg.psc_alpha)
    _check_within("psc_beta", cfg.psc_beta, 0.0, MAX_PSC_BETA)
    _check_within("step_weight", cfg.step_weight, 0.0, MAX_STEP_WEIGHT)
    _check_within("invalid_action_penalty", cfg.invalid_action_penalty, 0.0,
                  MAX_INVALID_ACTION_PENALTY)
    _check_positive("history_half_life", cfg.history_half_life)
    _check_within("history_prior", cfg.history_prior, 0.0, MAX_HISTORY_PRIOR)
    _check_within("hgpo_history_length", cfg.hgpo_history_length, 0, MAX_HGPO_HISTORY_LENGTH)
    _check_within("hgpo_alpha", cfg.hgpo_alpha, -MAX_ABS_HGPO_ALPHA, MAX_ABS_HGPO_ALPHA)
    _check_within("graph_success_value", cfg.graph_success_value, 0.0, MAX_GRAPH_SUCCESS_VALUE)
    _check_within("episode_weight", cfg.episode_weight, 0.0, MAX_EPISODE_WEIGHT)


def _check_within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValidationError(f"config.{name}", f"must be in [{low:g}, {high:g}], got {value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0.0:
        raise ValidationError(f"config.{name}", f"must be > 0, got {value}")


def resolve_config(
    preset: str = "",
    overrides: Mapping[str, Any] | None = None,
    *,
    default_similarity: Similarity = Similarity.TFIDF,
) -> EstimatorConfig:
    """Preset lookup, then overrides, then validation.

    `preset` "" means "proxmo". `overrides` use the proto field names; a value of None means
    unset. Enum values may be given as members or member names ("TFIDF"). `psc_range` sets
    psc_beta = range / 0.2310585786300049 and is exclusive with `psc_beta`. tau, unless the
    preset or the overrides set it, is 0.05 when the resolved similarity is ENCODER and 0.1
    otherwise. Raises ValidationError("config.<field>") on any bad value.
    """
    name = preset or DEFAULT_PRESET
    spec = PRESETS.get(name)
    if spec is None:
        known = ", ".join(PRESETS)
        raise ValidationError("config.preset",
                              f"unknown preset {echo(name)}; expected one of {known}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in _OVERRIDE_FIELDS:
            raise ValidationError(f"config.{key}", "unknown configuration field")
    if "psc_beta" in given and "psc_range" in given:
        raise ValidationError("config.psc_range", "give either psc_beta or psc_range, not both")
    values: dict[str, Any] = dict(BASE_VALUES)
    values.setdefault("similarity", default_similarity)
    values.update(spec.values)
    values.update({key: _coerce(key, value) for key, value in given.items()})
    psc_range = values.pop("psc_range", None)
    if psc_range is not None:
        _check_within("psc_range", psc_range, 0.0, MAX_PSC_RANGE)
        values["psc_beta"] = beta_from_range(psc_range)
    if "tau" not in values:
        encoder = values["similarity"] is Similarity.ENCODER
        values["tau"] = ENCODER_TAU if encoder else DEFAULT_TAU
    cfg = EstimatorConfig(preset=name, **values)
    _check_ranges(cfg)
    return cfg
