"""max_group_distinct_states: PSA's work per group is capped before any of it is done."""

from __future__ import annotations

import time

import pytest
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.errors import LimitExceeded
from proxmo.limits import Limits
from proxmo.server.config import load_settings
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import run, trajectory


def _request(preset: str = "paper", **config: object) -> pb.ComputeAdvantagesRequest:
    """Group "small" (2 distinct states, 4 rows) first, then group "wide" (4 distinct states in
    6 rows: duplicates count once), whose first trajectory is trajectories[2]."""
    small = ["You open the drawer 1.", "You see a mug 2."]
    wide = [
        "You arrive at shelf 1.",
        "You arrive at desk 1.",
        "You open the safe 1.",
        "You arrive at shelf 1.",
        "Nothing happens.",
        "Nothing happens.",
    ]
    return pb.ComputeAdvantagesRequest(
        request_id="limit",
        trajectories=[
            trajectory("s0", "small", [0.0, 1.0], states=small),
            trajectory("s1", "small", [0.0, 0.0], states=small[::-1]),
            trajectory("w0", "wide", [0.0, 0.0, 1.0], states=wide[:3]),
            trajectory("w1", "wide", [0.0, 0.0, 0.0], states=wide[3:]),
        ],
        config=pb.EstimatorConfig(preset=preset, **config),
    )


def _compute(
    request: pb.ComputeAdvantagesRequest, limits: Limits, similarity: Similarity = Similarity.TFIDF
) -> pb.ComputeAdvantagesResponse:
    engine = Engine(
        store=MemoryStore(),
        embedder=None,
        default_similarity=similarity,
        limits=limits,
        compute_threads=1,
    )
    try:
        return run(engine.compute(request))
    finally:
        engine.close()


def test_default_and_settings() -> None:
    assert Limits().max_group_distinct_states == 1024
    assert load_settings([]).limits.max_group_distinct_states == 1024
    flag = load_settings(["--max-group-distinct-states", "64"])
    assert flag.limits.max_group_distinct_states == 64
    from_env = load_settings([], environ={"PROXMO_MAX_GROUP_DISTINCT_STATES": "9"})
    assert from_env.limits.max_group_distinct_states == 9


@pytest.mark.parametrize(
    "config",
    [{}, {"similarity": pb.SIMILARITY_ENCODER}, {"scope": pb.SCOPE_SAME_STEP}],
    ids=["tfidf", "encoder", "same-step"],
)
def test_a_group_over_the_limit_is_refused_naming_it(config: dict[str, object]) -> None:
    # ENCODER: refused although this engine has no encoder (FAILED_PRECONDITION otherwise),
    # so the check runs before the encoder stage
    with pytest.raises(LimitExceeded) as caught:
        _compute(_request(**config), Limits(max_group_distinct_states=3))
    error = caught.value
    assert (error.grpc_code, error.http_status) == ("RESOURCE_EXHAUSTED", 413)
    assert error.field == "trajectories[2].group_id"
    assert error.message.startswith("group 'wide' has 4 distinct states, over the limit of 3")


def test_at_the_limit_is_accepted_and_duplicates_count_once() -> None:
    response = _compute(_request(), Limits(max_group_distinct_states=4))
    assert len(response.trajectories) == 4


@pytest.mark.parametrize("preset", ["gigpo", "grpo", "rloo", "hgpo", "graphgpo"])
def test_estimators_without_psa_are_not_limited(preset: str) -> None:
    response = _compute(_request(preset), Limits(max_group_distinct_states=1))
    assert len(response.trajectories) == 4


def test_exact_similarity_is_not_limited() -> None:
    response = _compute(
        _request(similarity=pb.SIMILARITY_EXACT), Limits(max_group_distinct_states=1)
    )
    assert len(response.trajectories) == 4


def test_precomputed_counts_distinct_vectors() -> None:
    # one text everywhere; the vectors decide how many states PSA compares
    def request(vectors: list[list[float]]) -> pb.ComputeAdvantagesRequest:
        return pb.ComputeAdvantagesRequest(
            trajectories=[
                trajectory(f"t{i}", "g", [float(i % 2)], states=["same text"], embeddings=[v])
                for i, v in enumerate(vectors)
            ],
            config=pb.EstimatorConfig(preset="paper", similarity=pb.SIMILARITY_PRECOMPUTED),
        )

    limits = Limits(max_group_distinct_states=2)
    repeated = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert len(_compute(request(repeated), limits).trajectories) == 4
    with pytest.raises(LimitExceeded) as caught:
        _compute(request([*repeated, [0.6, 0.8]]), limits)
    assert caught.value.field == "trajectories[0].group_id"
    assert "3 distinct states, over the limit of 2" in caught.value.message


def test_refused_before_any_work() -> None:
    # 20,000 distinct states in one group: PSA would compare 4e8 pairs (many seconds); the
    # refusal costs the validation only
    request = pb.ComputeAdvantagesRequest(
        trajectories=[
            pb.Trajectory(
                trajectory_id=f"t{k}",
                group_id="huge",
                steps=[pb.Step(state=f"room {k} item {t}") for t in range(1000)],
            )
            for k in range(20)
        ],
        config=pb.EstimatorConfig(preset="paper"),
    )
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as caught:
        _compute(request, Limits())
    assert caught.value.field == "trajectories[0].group_id"
    assert "20000 distinct states, over the limit of 1024" in caught.value.message
    assert time.monotonic() - started < 10.0
