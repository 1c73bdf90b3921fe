"""Bad input -> one InvalidArgument naming the exact field and index; nothing is written."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from proxmo.engine import Engine
from proxmo.errors import FailedPrecondition, InvalidArgument
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import group_request, run, trajectory

Mutation = Callable[[pb.ComputeAdvantagesRequest], None]


def _base() -> pb.ComputeAdvantagesRequest:
    # "proxmo" uses HISTORY: a bad request must not reach the store.
    return group_request(preset="proxmo", similarity=pb.SIMILARITY_TFIDF,
                         groups=(("g0", (True, False, True)), ("g1", (False, True))))


def _set_reward(i: int, t: int, value: float) -> Mutation:
    def mutate(request: pb.ComputeAdvantagesRequest) -> None:
        request.trajectories[i].steps[t].reward = value
    return mutate


def _embed_all(dim: int, *, odd_one: tuple[int, int, list[float]] | None = None,
               skip: tuple[int, int] | None = None) -> Mutation:
    def mutate(request: pb.ComputeAdvantagesRequest) -> None:
        request.config.similarity = pb.SIMILARITY_PRECOMPUTED
        for i, traj in enumerate(request.trajectories):
            for t, step in enumerate(traj.steps):
                if skip == (i, t):
                    continue
                if odd_one is not None and odd_one[:2] == (i, t):
                    step.state_embedding.extend(odd_one[2])
                else:
                    step.state_embedding.extend([1.0 + t] + [0.5] * (dim - 1))
    return mutate


def _clear_steps(i: int) -> Mutation:
    def mutate(request: pb.ComputeAdvantagesRequest) -> None:
        del request.trajectories[i].steps[:]
    return mutate


def _set_field(i: int, name: str, value: str) -> Mutation:
    def mutate(request: pb.ComputeAdvantagesRequest) -> None:
        setattr(request.trajectories[i], name, value)
    return mutate


def _config(**values: object) -> Mutation:
    def mutate(request: pb.ComputeAdvantagesRequest) -> None:
        for name, value in values.items():
            setattr(request.config, name, value)
    return mutate


def _no_trajectories(request: pb.ComputeAdvantagesRequest) -> None:
    del request.trajectories[:]


CASES: list[tuple[str, Mutation, str]] = [
    ("nan reward", _set_reward(1, 2, math.nan), "trajectories[1].steps[2].reward"),
    ("inf reward", _set_reward(3, 0, math.inf), "trajectories[3].steps[0].reward"),
    ("-inf reward", _set_reward(0, 1, -math.inf), "trajectories[0].steps[1].reward"),
    ("nan embedding", _embed_all(3, odd_one=(2, 1, [0.1, math.nan, 0.2])),
     "trajectories[2].steps[1].state_embedding"),
    ("embedding sizes differ", _embed_all(3, odd_one=(4, 1, [0.1, 0.2])),
     "trajectories[4].steps[1].state_embedding"),
    ("embedding missing for PRECOMPUTED", _embed_all(3, skip=(1, 1)),
     "trajectories[1].steps[1].state_embedding"),
    ("trajectory without steps", _clear_steps(2), "trajectories[2].steps"),
    ("duplicate trajectory_id", _set_field(3, "trajectory_id", "g0-t1"),
     "trajectories[3].trajectory_id"),
    ("empty trajectory_id", _set_field(1, "trajectory_id", ""), "trajectories[1].trajectory_id"),
    ("empty group_id", _set_field(4, "group_id", ""), "trajectories[4].group_id"),
    ("no trajectories", _no_trajectories, "trajectories"),
    ("unknown preset", _config(preset="ppo"), "config.preset"),
    ("tau zero", _config(tau=0.0), "config.tau"),
    ("tau negative", _config(tau=-0.1), "config.tau"),
    ("gamma above 1", _config(gamma=1.5), "config.gamma"),
    ("gamma below 0", _config(gamma=-0.01), "config.gamma"),
    ("both psc_beta and psc_range", _config(psc_beta=0.2, psc_range=0.05), "config.psc_range"),
]


@pytest.mark.parametrize(("mutate", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_field(
    engine: Engine, store: MemoryStore, mutate: Mutation, field: str
) -> None:
    request = _base()
    mutate(request)
    with pytest.raises(InvalidArgument) as caught:
        run(engine.compute(request))
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert error.grpc_code == "INVALID_ARGUMENT" and error.http_status == 422
    # Nothing half-done: the success-rate store was never touched.
    assert run(store.scan("", 100, ""))[0] == []


def test_the_first_bad_value_is_reported(engine: Engine) -> None:
    request = _base()
    _set_reward(4, 1, math.nan)(request)
    _set_reward(1, 0, math.inf)(request)
    with pytest.raises(InvalidArgument, match=r"^trajectories\[1\]\.steps\[0\]\.reward: "):
        run(engine.compute(request))


def test_message_shows_the_bad_value(engine: Engine) -> None:
    request = _base()
    _set_reward(0, 0, math.nan)(request)
    with pytest.raises(InvalidArgument, match="nan"):
        run(engine.compute(request))


def test_encoder_without_an_encoder_is_a_failed_precondition(engine: Engine) -> None:
    request = _base()
    request.config.similarity = pb.SIMILARITY_ENCODER
    with pytest.raises(FailedPrecondition) as caught:
        run(engine.compute(request))
    assert caught.value.field == "config.similarity"
    assert caught.value.grpc_code == "FAILED_PRECONDITION"


def test_precomputed_embeddings_are_ignored_by_other_similarities(engine: Engine) -> None:
    # Embeddings on only some steps are fine when the similarity does not use them.
    request = _base()
    request.trajectories[0].steps[0].state_embedding.extend([1.0, 0.0])
    response = run(engine.compute(request))
    assert len(response.trajectories) == len(request.trajectories)


def test_a_valid_single_trajectory_is_accepted(engine: Engine) -> None:
    request = pb.ComputeAdvantagesRequest(
        request_id="one", trajectories=[trajectory("a", "g", [0.0, 1.0])],
        config=pb.EstimatorConfig(preset="paper"),
    )
    response = run(engine.compute(request))
    assert [t.trajectory_id for t in response.trajectories] == ["a"]
