"""The estimator core: pure numpy/scipy/scikit-learn, no I/O (see docs/DESIGN.md "Core")."""

from proxmo.core.batch import StepBatch, TrajectoryInput, ValidationError
from proxmo.core.config import (
    DEFAULT_PRESET,
    DEFAULT_PSC_BETA,
    PRESETS,
    PSC_ESTIMATORS,
    SIGMOID_ONE_MINUS_HALF,
    Estimator,
    EstimatorConfig,
    Normalization,
    PresetSpec,
    Scope,
    Similarity,
    StatsUnit,
    SuccessRateSource,
    beta_from_range,
    required_features,
    resolve_config,
    uses_history,
)
from proxmo.core.episode import batch_success_counts, psc_weights
from proxmo.core.estimators import (
    ESTIMATORS,
    AdvantageResult,
    EstimatorFn,
    GroupDiagnostics,
    compute_advantages,
)
from proxmo.core.history import (
    apply_update,
    decay,
    group_success_rates,
    success_rate,
    task_batch_counts,
)
from proxmo.core.returns import discounted_returns
from proxmo.core.step import StateFeatures, dense_features, precomputed_features
from proxmo.core.tfidf import tfidf_features

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_PSC_BETA",
    "ESTIMATORS",
    "PRESETS",
    "PSC_ESTIMATORS",
    "SIGMOID_ONE_MINUS_HALF",
    "AdvantageResult",
    "Estimator",
    "EstimatorConfig",
    "EstimatorFn",
    "GroupDiagnostics",
    "Normalization",
    "PresetSpec",
    "Scope",
    "Similarity",
    "StateFeatures",
    "StatsUnit",
    "StepBatch",
    "SuccessRateSource",
    "TrajectoryInput",
    "ValidationError",
    "apply_update",
    "batch_success_counts",
    "beta_from_range",
    "compute_advantages",
    "decay",
    "dense_features",
    "discounted_returns",
    "group_success_rates",
    "precomputed_features",
    "psc_weights",
    "required_features",
    "resolve_config",
    "success_rate",
    "task_batch_counts",
    "tfidf_features",
    "uses_history",
]
