"""Protobuf <-> core conversion. No computation happens here.

Enums map by name: the proto value ``<ENUM_TYPE_IN_UPPER_SNAKE>_<NAME>`` (``ESTIMATOR_PROXMO``,
``SUCCESS_RATE_SOURCE_HISTORY``) is the core enum member ``<EnumType>.<NAME>`` of the class of
the same name in ``proxmo.core.config``. Config fields map by name as well, by walking the proto
descriptor, so there is no hand-written table that can drift from the proto.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor

from proxmo.core import config as core_config
from proxmo.core.batch import StepBatch, TrajectoryInput, ValidationError
from proxmo.core.config import EstimatorConfig, SuccessRateSource
from proxmo.core.estimators import AdvantageResult
from proxmo.proto import pb

_PROTO_ENUMS: Mapping[str, EnumDescriptor] = pb.DESCRIPTOR.enum_types_by_name
_CONFIG_FIELDS: Sequence[FieldDescriptor] = list(
    pb.DESCRIPTOR.message_types_by_name["EstimatorConfig"].fields)
# `psc_range` is an input-only spelling of `psc_beta` (beta = range / 0.2310585786300049);
# the resolved config carries beta alone, so that echoing it back is a valid request.
_INPUT_ONLY_CONFIG_FIELDS = frozenset({"psc_range"})


def _enum_prefix(enum: EnumDescriptor) -> str:
    """``SuccessRateSource`` -> ``SUCCESS_RATE_SOURCE_`` (buf's enum value prefix rule)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def core_enum_class(enum: EnumDescriptor) -> type[Enum]:
    """The core enum class named like the proto enum (``proxmo.core.config.<Name>``)."""
    cls = getattr(core_config, enum.name)
    assert isinstance(cls, type) and issubclass(cls, Enum), enum.name
    return cls


def to_core_enum(enum: EnumDescriptor, number: int) -> Enum | None:
    """Proto enum number -> core member; ``None`` for ``*_UNSPECIFIED`` (= the preset's)."""
    if number == 0:
        return None
    name = enum.values_by_number[number].name.removeprefix(_enum_prefix(enum))
    return core_enum_class(enum)[name]


def to_proto_enum(value: Enum) -> int:
    """Core enum member -> proto enum number."""
    enum = _PROTO_ENUMS[type(value).__name__]
    return int(enum.values_by_name[_enum_prefix(enum) + value.name].number)


# --- request -> core ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoreRequest:
    """What the core needs from a ComputeAdvantagesRequest."""

    trajectories: list[TrajectoryInput]
    preset: str
    overrides: dict[str, Any]  # proto field name -> value; only fields the client set


def config_overrides(config: pb.EstimatorConfig) -> dict[str, Any]:
    """The fields the client set, by proto presence: optional scalars that are present and
    enums that are not UNSPECIFIED. Enums become core members. ``preset`` is not included."""
    overrides: dict[str, Any] = {}
    for field in _CONFIG_FIELDS:
        if field.name == "preset":
            continue
        if field.enum_type is not None:
            number = getattr(config, field.name)
            # proto3 enums are open: an unknown number arrives intact and must be refused here.
            if number not in field.enum_type.values_by_number:
                raise ValidationError(
                    f"config.{field.name}", f"unknown {field.enum_type.name} value {number}"
                )
            member = to_core_enum(field.enum_type, number)
            if member is not None:
                overrides[field.name] = member
        elif config.HasField(field.name):
            overrides[field.name] = getattr(config, field.name)
    return overrides


def trajectory_input(trajectory: pb.Trajectory) -> TrajectoryInput:
    """One proto Trajectory as the core's plain-Python input (values are not validated here)."""
    # One pass over the steps: every field access on a protobuf step builds a Python object,
    # so reading each column in its own loop (and copying every empty embedding) cost ~4x more.
    states: list[str] = []
    rewards: list[float] = []
    invalid: list[bool] = []
    state_keys: list[str] = []
    any_key = any_embedding = False
    for step in trajectory.steps:
        states.append(step.state)
        rewards.append(step.reward)
        invalid.append(step.invalid_action)
        key = step.state_key
        state_keys.append(key)
        any_key = any_key or bool(key)
        any_embedding = any_embedding or len(step.state_embedding) > 0
    # Optional per-step fields are passed only when at least one step carries them; the core
    # then reports the first step that lacks one.
    embeddings = [list(s.state_embedding) for s in trajectory.steps] if any_embedding else None
    return TrajectoryInput(
        trajectory_id=trajectory.trajectory_id,
        group_id=trajectory.group_id,
        task_id=trajectory.task_id,
        states=states,
        rewards=rewards,
        invalid=invalid,
        state_keys=state_keys if any_key else None,
        embeddings=embeddings,
        success=trajectory.success if trajectory.HasField("success") else None,
    )


def request_to_core(request: pb.ComputeAdvantagesRequest) -> CoreRequest:
    """ComputeAdvantagesRequest -> trajectories + the preset name + the explicit overrides."""
    return CoreRequest(
        trajectories=[trajectory_input(t) for t in request.trajectories],
        preset=request.config.preset,
        overrides=config_overrides(request.config),
    )


# --- core -> response --------------------------------------------------------------------


def config_to_proto(cfg: EstimatorConfig) -> pb.EstimatorConfig:
    """A resolved core config with every proto field set (``psc_range`` excepted: see above)."""
    message = pb.EstimatorConfig(preset=cfg.preset)
    for field in _CONFIG_FIELDS:
        if field.name == "preset" or field.name in _INPUT_ONLY_CONFIG_FIELDS:
            continue
        value = getattr(cfg, field.name)
        setattr(message, field.name, to_proto_enum(value) if field.enum_type else value)
    return message


# GroupReport fields copied straight from the core's per-group diagnostics arrays.
_GROUP_DIAGNOSTIC_FIELDS: tuple[str, ...] = (
    "num_trajectories",
    "num_steps",
    "num_successes",
    "success_rate",
    "weight_success",
    "weight_failure",
    "singleton_fraction",
    "mean_effective_neighbors",
    "hgpo_long_history_fraction",
    "graph_mean_distance",
    "graph_unreachable_fraction",
)


def build_response(
    *,
    request_id: str,
    batch: StepBatch,
    result: AdvantageResult,
    cfg: EstimatorConfig,
    fallback: np.ndarray,
    replayed: bool,
    timing: pb.Timing,
) -> pb.ComputeAdvantagesResponse:
    """AdvantageResult -> response: trajectories in request order (split at the batch's
    trajectory offsets), groups in order of first appearance. ``fallback`` (bool[n_groups])
    marks groups whose HISTORY p was replaced by the batch estimate: their source reads BATCH
    and ``success_rate_fallback`` is set."""
    response = pb.ComputeAdvantagesResponse(request_id=request_id, replayed=replayed)
    offsets = batch.traj_offsets.tolist()
    columns = {
        name: getattr(result, name).tolist()
        for name in ("advantages", "episode_advantages", "step_advantages", "returns")
    }
    for i, trajectory_id in enumerate(batch.trajectory_ids):
        lo, hi = offsets[i], offsets[i + 1]
        response.trajectories.add(
            trajectory_id=trajectory_id,
            **{name: values[lo:hi] for name, values in columns.items()},
        )
    diagnostics = {
        name: np.asarray(getattr(result.groups, name)).tolist() for name in _GROUP_DIAGNOSTIC_FIELDS
    }
    for g, group_id in enumerate(batch.group_ids):
        source = SuccessRateSource.BATCH if fallback[g] else result.groups.success_rate_source[g]
        response.groups.add(
            group_id=group_id,
            task_id=batch.group_task[g],
            success_rate_source=to_proto_enum(source),
            success_rate_fallback=bool(fallback[g]),
            **{name: values[g] for name, values in diagnostics.items()},
        )
    response.resolved_config.CopyFrom(config_to_proto(cfg))
    response.timing.CopyFrom(timing)
    return response


def preset_to_proto(name: str, description: str, cfg: EstimatorConfig) -> pb.Preset:
    """One entry of GetServerInfoResponse.presets."""
    return pb.Preset(name=name, description=description, config=config_to_proto(cfg))

