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

from proxmo.core.batch import ValidationError

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


# Defaults shared by every preset (ALGORITHM.md sections 1-4).
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
_BOOL_FIELDS = frozenset({"psc_enabled"})
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
        raise ValidationError(where, f"unknown value {value!r}; expected one of {allowed}")
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        raise ValidationError(where, f"must be a boolean, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(where, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(where, f"must be finite, got {number}")
    return number


def _check_ranges(cfg: EstimatorConfig) -> None:
    """Range checks of a resolved configuration (each names its field)."""
    if not 0.0 <= cfg.gamma <= 1.0:
        raise ValidationError("config.gamma", f"must be in [0, 1], got {cfg.gamma}")
    if cfg.tau <= 0.0:
        raise ValidationError("config.tau", f"must be > 0, got {cfg.tau}")
    if cfg.psc_alpha <= 0.0:
        raise ValidationError("config.psc_alpha", f"must be > 0, got {cfg.psc_alpha}")
    if cfg.psc_beta < 0.0:
        raise ValidationError("config.psc_beta", f"must be >= 0, got {cfg.psc_beta}")
    if cfg.invalid_action_penalty < 0.0:
        raise ValidationError(
            "config.invalid_action_penalty", f"must be >= 0, got {cfg.invalid_action_penalty}"
        )
    if cfg.history_half_life <= 0.0:
        raise ValidationError(
            "config.history_half_life", f"must be > 0, got {cfg.history_half_life}"
        )
    if cfg.history_prior < 0.0:
        raise ValidationError("config.history_prior", f"must be >= 0, got {cfg.history_prior}")


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
        raise ValidationError("config.preset", f"unknown preset {name!r}; expected one of {known}")
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
        if psc_range < 0.0:
            raise ValidationError("config.psc_range", f"must be >= 0, got {psc_range}")
        values["psc_beta"] = beta_from_range(psc_range)
    if "tau" not in values:
        encoder = values["similarity"] is Similarity.ENCODER
        values["tau"] = ENCODER_TAU if encoder else DEFAULT_TAU
    cfg = EstimatorConfig(preset=name, **values)
    _check_ranges(cfg)
    return cfg
