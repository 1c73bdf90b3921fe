import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Estimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATOR_UNSPECIFIED: _ClassVar[Estimator]
    ESTIMATOR_PROXMO: _ClassVar[Estimator]
    ESTIMATOR_GIGPO: _ClassVar[Estimator]
    ESTIMATOR_GRPO: _ClassVar[Estimator]
    ESTIMATOR_RLOO: _ClassVar[Estimator]
    ESTIMATOR_HGPO: _ClassVar[Estimator]
    ESTIMATOR_GRAPHGPO: _ClassVar[Estimator]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_MEAN: _ClassVar[Normalization]
    NORMALIZATION_MEAN_STD: _ClassVar[Normalization]

class StatsUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATS_UNIT_UNSPECIFIED: _ClassVar[StatsUnit]
    STATS_UNIT_TRAJECTORY: _ClassVar[StatsUnit]
    STATS_UNIT_STEP: _ClassVar[StatsUnit]

class SuccessRateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUCCESS_RATE_SOURCE_UNSPECIFIED: _ClassVar[SuccessRateSource]
    SUCCESS_RATE_SOURCE_BATCH: _ClassVar[SuccessRateSource]
    SUCCESS_RATE_SOURCE_ROW_MEAN: _ClassVar[SuccessRateSource]
    SUCCESS_RATE_SOURCE_HISTORY: _ClassVar[SuccessRateSource]

class Similarity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIMILARITY_UNSPECIFIED: _ClassVar[Similarity]
    SIMILARITY_TFIDF: _ClassVar[Similarity]
    SIMILARITY_ENCODER: _ClassVar[Similarity]
    SIMILARITY_EXACT: _ClassVar[Similarity]
    SIMILARITY_PRECOMPUTED: _ClassVar[Similarity]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_GROUP: _ClassVar[Scope]
    SCOPE_SAME_STEP: _ClassVar[Scope]
ESTIMATOR_UNSPECIFIED: Estimator
ESTIMATOR_PROXMO: Estimator
ESTIMATOR_GIGPO: Estimator
ESTIMATOR_GRPO: Estimator
ESTIMATOR_RLOO: Estimator
ESTIMATOR_HGPO: Estimator
ESTIMATOR_GRAPHGPO: Estimator
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_MEAN: Normalization
NORMALIZATION_MEAN_STD: Normalization
STATS_UNIT_UNSPECIFIED: StatsUnit
STATS_UNIT_TRAJECTORY: StatsUnit
STATS_UNIT_STEP: StatsUnit
SUCCESS_RATE_SOURCE_UNSPECIFIED: SuccessRateSource
SUCCESS_RATE_SOURCE_BATCH: SuccessRateSource
SUCCESS_RATE_SOURCE_ROW_MEAN: SuccessRateSource
SUCCESS_RATE_SOURCE_HISTORY: SuccessRateSource
SIMILARITY_UNSPECIFIED: Similarity
SIMILARITY_TFIDF: Similarity
SIMILARITY_ENCODER: Similarity
SIMILARITY_EXACT: Similarity
SIMILARITY_PRECOMPUTED: Similarity
SCOPE_UNSPECIFIED: Scope
SCOPE_GROUP: Scope
SCOPE_SAME_STEP: Scope

class Step(_message.Message):
    __slots__ = ("state", "reward", "invalid_action", "state_embedding", "state_key")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    INVALID_ACTION_FIELD_NUMBER: _ClassVar[int]
    STATE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    STATE_KEY_FIELD_NUMBER: _ClassVar[int]
    state: str
    reward: float
    invalid_action: bool
    state_embedding: _containers.RepeatedScalarFieldContainer[float]
    state_key: str
    def __init__(self, state: _Optional[str] = ..., reward: _Optional[float] = ..., invalid_action: _Optional[bool] = ..., state_embedding: _Optional[_Iterable[float]] = ..., state_key: _Optional[str] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("trajectory_id", "group_id", "task_id", "steps", "success")
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    trajectory_id: str
    group_id: str
    task_id: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    success: bool
    def __init__(self, trajectory_id: _Optional[str] = ..., group_id: _Optional[str] = ..., task_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., success: _Optional[bool] = ...) -> None: ...

class EstimatorConfig(_message.Message):
    __slots__ = ("preset", "estimator", "gamma", "tau", "step_weight", "psc_enabled", "psc_alpha", "psc_beta", "psc_range", "invalid_action_penalty", "success_threshold", "episode_normalization", "step_normalization", "stats_unit", "success_rate_source", "similarity", "scope", "history_half_life", "history_prior", "hgpo_history_length", "hgpo_alpha", "hgpo_base_group", "graph_normalize_distance", "graph_success_value", "episode_weight")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    STEP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PSC_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PSC_ALPHA_FIELD_NUMBER: _ClassVar[int]
    PSC_BETA_FIELD_NUMBER: _ClassVar[int]
    PSC_RANGE_FIELD_NUMBER: _ClassVar[int]
    INVALID_ACTION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EPISODE_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    STEP_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    STATS_UNIT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_HALF_LIFE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_PRIOR_FIELD_NUMBER: _ClassVar[int]
    HGPO_HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HGPO_ALPHA_FIELD_NUMBER: _ClassVar[int]
    HGPO_BASE_GROUP_FIELD_NUMBER: _ClassVar[int]
    GRAPH_NORMALIZE_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SUCCESS_VALUE_FIELD_NUMBER: _ClassVar[int]
    EPISODE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    preset: str
    estimator: Estimator
    gamma: float
    tau: float
    step_weight: float
    psc_enabled: bool
    psc_alpha: float
    psc_beta: float
    psc_range: float
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
    hgpo_history_length: int
    hgpo_alpha: float
    hgpo_base_group: bool
    graph_normalize_distance: bool
    graph_success_value: float
    episode_weight: float
    def __init__(self, preset: _Optional[str] = ..., estimator: _Optional[_Union[Estimator, str]] = ..., gamma: _Optional[float] = ..., tau: _Optional[float] = ..., step_weight: _Optional[float] = ..., psc_enabled: _Optional[bool] = ..., psc_alpha: _Optional[float] = ..., psc_beta: _Optional[float] = ..., psc_range: _Optional[float] = ..., invalid_action_penalty: _Optional[float] = ..., success_threshold: _Optional[float] = ..., episode_normalization: _Optional[_Union[Normalization, str]] = ..., step_normalization: _Optional[_Union[Normalization, str]] = ..., stats_unit: _Optional[_Union[StatsUnit, str]] = ..., success_rate_source: _Optional[_Union[SuccessRateSource, str]] = ..., similarity: _Optional[_Union[Similarity, str]] = ..., scope: _Optional[_Union[Scope, str]] = ..., history_half_life: _Optional[float] = ..., history_prior: _Optional[float] = ..., hgpo_history_length: _Optional[int] = ..., hgpo_alpha: _Optional[float] = ..., hgpo_base_group: _Optional[bool] = ..., graph_normalize_distance: _Optional[bool] = ..., graph_success_value: _Optional[float] = ..., episode_weight: _Optional[float] = ...) -> None: ...

class ComputeAdvantagesRequest(_message.Message):
    __slots__ = ("request_id", "trajectories", "config", "dry_run")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trajectories: _containers.RepeatedCompositeFieldContainer[Trajectory]
    config: EstimatorConfig
    dry_run: bool
    def __init__(self, request_id: _Optional[str] = ..., trajectories: _Optional[_Iterable[_Union[Trajectory, _Mapping]]] = ..., config: _Optional[_Union[EstimatorConfig, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class TrajectoryAdvantages(_message.Message):
    __slots__ = ("trajectory_id", "advantages", "episode_advantages", "step_advantages", "returns")
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    STEP_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    trajectory_id: str
    advantages: _containers.RepeatedScalarFieldContainer[float]
    episode_advantages: _containers.RepeatedScalarFieldContainer[float]
    step_advantages: _containers.RepeatedScalarFieldContainer[float]
    returns: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, trajectory_id: _Optional[str] = ..., advantages: _Optional[_Iterable[float]] = ..., episode_advantages: _Optional[_Iterable[float]] = ..., step_advantages: _Optional[_Iterable[float]] = ..., returns: _Optional[_Iterable[float]] = ...) -> None: ...

class GroupReport(_message.Message):
    __slots__ = ("group_id", "task_id", "num_trajectories", "num_steps", "num_successes", "success_rate", "success_rate_source", "success_rate_fallback", "weight_success", "weight_failure", "singleton_fraction", "mean_effective_neighbors", "hgpo_long_history_fraction", "graph_mean_distance", "graph_unreachable_fraction")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FAILURE_FIELD_NUMBER: _ClassVar[int]
    SINGLETON_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_EFFECTIVE_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    HGPO_LONG_HISTORY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_MEAN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_UNREACHABLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    task_id: str
    num_trajectories: int
    num_steps: int
    num_successes: int
    success_rate: float
    success_rate_source: SuccessRateSource
    success_rate_fallback: bool
    weight_success: float
    weight_failure: float
    singleton_fraction: float
    mean_effective_neighbors: float
    hgpo_long_history_fraction: float
    graph_mean_distance: float
    graph_unreachable_fraction: float
    def __init__(self, group_id: _Optional[str] = ..., task_id: _Optional[str] = ..., num_trajectories: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_successes: _Optional[int] = ..., success_rate: _Optional[float] = ..., success_rate_source: _Optional[_Union[SuccessRateSource, str]] = ..., success_rate_fallback: _Optional[bool] = ..., weight_success: _Optional[float] = ..., weight_failure: _Optional[float] = ..., singleton_fraction: _Optional[float] = ..., mean_effective_neighbors: _Optional[float] = ..., hgpo_long_history_fraction: _Optional[float] = ..., graph_mean_distance: _Optional[float] = ..., graph_unreachable_fraction: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("total_ns", "queue_ns", "featurize_ns", "store_ns", "compute_ns", "num_steps", "num_unique_states", "num_encoded_states")
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    FEATURIZE_NS_FIELD_NUMBER: _ClassVar[int]
    STORE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_UNIQUE_STATES_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODED_STATES_FIELD_NUMBER: _ClassVar[int]
    total_ns: int
    queue_ns: int
    featurize_ns: int
    store_ns: int
    compute_ns: int
    num_steps: int
    num_unique_states: int
    num_encoded_states: int
    def __init__(self, total_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ..., featurize_ns: _Optional[int] = ..., store_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_unique_states: _Optional[int] = ..., num_encoded_states: _Optional[int] = ...) -> None: ...

class ComputeAdvantagesResponse(_message.Message):
    __slots__ = ("request_id", "trajectories", "groups", "resolved_config", "replayed", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trajectories: _containers.RepeatedCompositeFieldContainer[TrajectoryAdvantages]
    groups: _containers.RepeatedCompositeFieldContainer[GroupReport]
    resolved_config: EstimatorConfig
    replayed: bool
    timing: Timing
    def __init__(self, request_id: _Optional[str] = ..., trajectories: _Optional[_Iterable[_Union[TrajectoryAdvantages, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupReport, _Mapping]]] = ..., resolved_config: _Optional[_Union[EstimatorConfig, _Mapping]] = ..., replayed: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class PrefetchStatesRequest(_message.Message):
    __slots__ = ("states", "wait")
    STATES_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[str]
    wait: bool
    def __init__(self, states: _Optional[_Iterable[str]] = ..., wait: _Optional[bool] = ...) -> None: ...

class PrefetchStatesResponse(_message.Message):
    __slots__ = ("distinct_states", "cached_states", "queued_states", "dropped_states")
    DISTINCT_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHED_STATES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STATES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STATES_FIELD_NUMBER: _ClassVar[int]
    distinct_states: int
    cached_states: int
    queued_states: int
    dropped_states: int
    def __init__(self, distinct_states: _Optional[int] = ..., cached_states: _Optional[int] = ..., queued_states: _Optional[int] = ..., dropped_states: _Optional[int] = ...) -> None: ...

class GetSuccessRatesRequest(_message.Message):
    __slots__ = ("task_ids", "prefix", "page_size", "page_token")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TaskSuccessRate(_message.Message):
    __slots__ = ("task_id", "success_rate", "decayed_successes", "decayed_trials", "total_successes", "total_trials", "updates", "last_update_time")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    DECAYED_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    DECAYED_TRIALS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TRIALS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    success_rate: float
    decayed_successes: float
    decayed_trials: float
    total_successes: int
    total_trials: int
    updates: int
    last_update_time: _timestamp_pb2.Timestamp
    def __init__(self, task_id: _Optional[str] = ..., success_rate: _Optional[float] = ..., decayed_successes: _Optional[float] = ..., decayed_trials: _Optional[float] = ..., total_successes: _Optional[int] = ..., total_trials: _Optional[int] = ..., updates: _Optional[int] = ..., last_update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetSuccessRatesResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSuccessRate]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSuccessRate, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResetSuccessRatesRequest(_message.Message):
    __slots__ = ("task_ids", "all_tasks")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_TASKS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    all_tasks: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., all_tasks: _Optional[bool] = ...) -> None: ...

class ResetSuccessRatesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preset(_message.Message):
    __slots__ = ("name", "description", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    config: EstimatorConfig
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., config: _Optional[_Union[EstimatorConfig, _Mapping]] = ...) -> None: ...

class EncoderInfo(_message.Message):
    __slots__ = ("model_id", "model_sha256", "backend", "device", "dtype", "dimension", "fallback_reasons", "ready", "states_per_second")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASONS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STATES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_sha256: str
    backend: str
    device: str
    dtype: str
    dimension: int
    fallback_reasons: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    states_per_second: float
    def __init__(self, model_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., dimension: _Optional[int] = ..., fallback_reasons: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., states_per_second: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_trajectories", "max_steps_per_trajectory", "max_total_steps", "max_state_chars", "max_concurrency", "max_embedding_dim", "max_id_chars", "max_tasks_per_request", "max_group_distinct_states")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_PER_TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STATE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUP_DISTINCT_STATES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_trajectories: int
    max_steps_per_trajectory: int
    max_total_steps: int
    max_state_chars: int
    max_concurrency: int
    max_embedding_dim: int
    max_id_chars: int
    max_tasks_per_request: int
    max_group_distinct_states: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_trajectories: _Optional[int] = ..., max_steps_per_trajectory: _Optional[int] = ..., max_total_steps: _Optional[int] = ..., max_state_chars: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., max_embedding_dim: _Optional[int] = ..., max_id_chars: _Optional[int] = ..., max_tasks_per_request: _Optional[int] = ..., max_group_distinct_states: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "git_sha", "default_preset", "presets", "default_similarity", "similarities", "encoder", "limits", "success_rate_store", "success_rate_namespace")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GIT_SHA_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRESET_FIELD_NUMBER: _ClassVar[int]
    PRESETS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_STORE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    version: str
    git_sha: str
    default_preset: str
    presets: _containers.RepeatedCompositeFieldContainer[Preset]
    default_similarity: Similarity
    similarities: _containers.RepeatedScalarFieldContainer[Similarity]
    encoder: EncoderInfo
    limits: Limits
    success_rate_store: str
    success_rate_namespace: str
    def __init__(self, version: _Optional[str] = ..., git_sha: _Optional[str] = ..., default_preset: _Optional[str] = ..., presets: _Optional[_Iterable[_Union[Preset, _Mapping]]] = ..., default_similarity: _Optional[_Union[Similarity, str]] = ..., similarities: _Optional[_Iterable[_Union[Similarity, str]]] = ..., encoder: _Optional[_Union[EncoderInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., success_rate_store: _Optional[str] = ..., success_rate_namespace: _Optional[str] = ...) -> None: ...
