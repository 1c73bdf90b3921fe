"""proto <-> core conversion: enums by name, config presence, resolved config round trip."""

from __future__ import annotations

import math

import pytest
from proxmo.convert import (
    config_overrides,
    config_to_proto,
    core_enum_class,
    request_to_core,
    to_core_enum,
    to_proto_enum,
)
from proxmo.core.config import (
    PRESETS,
    Estimator,
    Similarity,
    SuccessRateSource,
    resolve_config,
)
from proxmo_client.v1 import proxmo_pb2 as pb

PROTO_ENUMS = list(pb.DESCRIPTOR.enum_types_by_name.values())


@pytest.mark.parametrize("enum", PROTO_ENUMS, ids=[e.name for e in PROTO_ENUMS])
def test_every_proto_enum_value_maps_and_back(enum) -> None:  # type: ignore[no-untyped-def]
    core_cls = core_enum_class(enum)
    mapped = set()
    for value in enum.values:
        member = to_core_enum(enum, value.number)
        if value.number == 0:
            assert member is None and value.name.endswith("_UNSPECIFIED")
            continue
        assert member is not None
        assert to_proto_enum(member) == value.number
        mapped.add(member)
    # ... and every core member has a proto value (no core-only member).
    assert mapped == set(core_cls)


def test_enum_examples() -> None:
    assert to_core_enum(pb.Estimator.DESCRIPTOR, pb.ESTIMATOR_PROXMO) is Estimator.PROXMO
    assert to_proto_enum(SuccessRateSource.HISTORY) == pb.SUCCESS_RATE_SOURCE_HISTORY
    assert to_proto_enum(Similarity.PRECOMPUTED) == pb.SIMILARITY_PRECOMPUTED


def test_only_present_fields_override() -> None:
    assert config_overrides(pb.EstimatorConfig(preset="gigpo")) == {}
    # Explicit zeros and False are overrides too: presence, not truthiness.
    config = pb.EstimatorConfig(
        gamma=0.0, psc_enabled=False, step_weight=0.0, similarity=pb.SIMILARITY_EXACT,
    )
    assert config_overrides(config) == {
        "gamma": 0.0, "psc_enabled": False, "step_weight": 0.0, "similarity": Similarity.EXACT,
    }
    assert config_overrides(pb.EstimatorConfig(psc_range=0.05)) == {"psc_range": 0.05}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_resolved_config_sets_every_field_and_round_trips(preset: str) -> None:
    cfg = resolve_config(preset, default_similarity=Similarity.TFIDF)
    message = config_to_proto(cfg)
    for field in pb.EstimatorConfig.DESCRIPTOR.fields:
        if field.name == "psc_range":  # input-only spelling of psc_beta
            assert not message.HasField("psc_range")
        elif field.enum_type is not None:
            assert getattr(message, field.name) != 0, field.name
        elif field.has_presence:
            assert message.HasField(field.name), field.name
    assert message.preset == preset
    # Sending the resolved config back resolves to the same config.
    again = resolve_config(message.preset, config_overrides(message),
                           default_similarity=Similarity.ENCODER)
    assert again == cfg


def test_psc_range_resolves_to_beta() -> None:
    cfg = resolve_config("paper", config_overrides(pb.EstimatorConfig(psc_range=0.05)))
    assert math.isclose(config_to_proto(cfg).psc_beta, 0.216395, abs_tol=1e-6)


def test_request_to_core_keeps_optional_step_fields() -> None:
    request = pb.ComputeAdvantagesRequest(
        trajectories=[
            pb.Trajectory(trajectory_id="a", group_id="g", task_id="task", success=False, steps=[
                pb.Step(state="s0", reward=1.5, invalid_action=True, state_key="k0",
                        state_embedding=[1.0, 0.0]),
                pb.Step(state="s1", reward=-1.0, state_embedding=[0.0, 1.0]),
            ]),
            pb.Trajectory(trajectory_id="b", group_id="g", steps=[pb.Step(state="s0")]),
        ],
        config=pb.EstimatorConfig(preset="gigpo", tau=0.2),
    )
    core = request_to_core(request)
    a, b = core.trajectories
    assert (a.trajectory_id, a.group_id, a.task_id, a.success) == ("a", "g", "task", False)
    assert list(a.states) == ["s0", "s1"] and list(a.rewards) == [1.5, -1.0]
    assert list(a.invalid) == [True, False]
    assert a.state_keys is not None and list(a.state_keys) == ["k0", ""]
    assert a.embeddings is not None and [list(e) for e in a.embeddings] == [[1, 0], [0, 1]]
    assert b.success is None and b.state_keys is None and b.embeddings is None
    assert core.preset == "gigpo" and core.overrides == {"tau": 0.2}
