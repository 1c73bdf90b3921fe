"""The core's bad-input table over both doors: each case names its field, on gRPC and REST,
with the same message; nothing reaches the success-rate store."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import httpx
import pytest
from google.protobuf import json_format
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, make_request, unique

Mutation = Callable[[pb.ComputeAdvantagesRequest], None]


def _reward(i: int, t: int, value: float) -> Mutation:
    def mutate(r: pb.ComputeAdvantagesRequest) -> None:
        r.trajectories[i].steps[t].reward = value
    return mutate


def _traj(i: int, name: str, value: str) -> Mutation:
    def mutate(r: pb.ComputeAdvantagesRequest) -> None:
        setattr(r.trajectories[i], name, value)
    return mutate


def _no_steps(i: int) -> Mutation:
    def mutate(r: pb.ComputeAdvantagesRequest) -> None:
        del r.trajectories[i].steps[:]
    return mutate


def _no_trajectories(r: pb.ComputeAdvantagesRequest) -> None:
    del r.trajectories[:]


def _config(**values: object) -> Mutation:
    def mutate(r: pb.ComputeAdvantagesRequest) -> None:
        for name, value in values.items():
            setattr(r.config, name, value)
    return mutate


def _embeddings(odd: tuple[int, int, list[float]]) -> Mutation:
    def mutate(r: pb.ComputeAdvantagesRequest) -> None:
        r.config.similarity = pb.SIMILARITY_PRECOMPUTED
        for i, trajectory in enumerate(r.trajectories):
            for t, step in enumerate(trajectory.steps):
                step.state_embedding.extend(odd[2] if (i, t) == odd[:2] else [1.0, 0.5, 0.25])
    return mutate


# (case, mutation, gRPC code, HTTP status, field)
CASES: list[tuple[str, Mutation, str, int, str]] = [
    ("nan reward", _reward(1, 2, math.nan), "INVALID_ARGUMENT", 422,
     "trajectories[1].steps[2].reward"),
    ("inf reward", _reward(3, 0, math.inf), "INVALID_ARGUMENT", 422,
     "trajectories[3].steps[0].reward"),
    ("trajectory without steps", _no_steps(2), "INVALID_ARGUMENT", 422, "trajectories[2].steps"),
    ("duplicate trajectory_id", _traj(3, "trajectory_id", "g0-t1"), "INVALID_ARGUMENT", 422,
     "trajectories[3].trajectory_id"),
    ("empty trajectory_id", _traj(1, "trajectory_id", ""), "INVALID_ARGUMENT", 422,
     "trajectories[1].trajectory_id"),
    ("empty group_id", _traj(4, "group_id", ""), "INVALID_ARGUMENT", 422,
     "trajectories[4].group_id"),
    ("no trajectories", _no_trajectories, "INVALID_ARGUMENT", 422, "trajectories"),
    ("unknown preset", _config(preset="ppo"), "INVALID_ARGUMENT", 422, "config.preset"),
    ("tau zero", _config(tau=0.0), "INVALID_ARGUMENT", 422, "config.tau"),
    ("gamma above 1", _config(gamma=1.5), "INVALID_ARGUMENT", 422, "config.gamma"),
    ("psc_beta and psc_range", _config(psc_beta=0.2, psc_range=0.05), "INVALID_ARGUMENT", 422,
     "config.psc_range"),
    ("nan embedding", _embeddings((2, 1, [0.1, math.nan, 0.2])), "INVALID_ARGUMENT", 422,
     "trajectories[2].steps[1].state_embedding"),
    ("embedding sizes differ", _embeddings((4, 1, [0.1, 0.2])), "INVALID_ARGUMENT", 422,
     "trajectories[4].steps[1].state_embedding"),
    ("encoder on a server without one", _config(similarity=pb.SIMILARITY_ENCODER),
     "FAILED_PRECONDITION", 400, "config.similarity"),
]


@pytest.mark.parametrize(("mutate", "code", "http_status", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_names_the_field_on_both_doors(
    server: ServerProcess, mutate: Mutation, code: str, http_status: int, field: str
) -> None:
    prefix = unique("bad")
    request = make_request(request_id=prefix, task_prefix=prefix, groups=2, per_group=3)
    mutate(request)

    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ComputeAdvantages(request, timeout=10)
    assert caught.value.code().name == code
    grpc_message = caught.value.details()
    assert grpc_message.startswith(f"{field}: ")

    answer = httpx.post(f"{server.http_url}/v1/advantages",
                        content=json_format.MessageToJson(request), timeout=10)
    assert answer.status_code == http_status
    error = answer.json()["error"]
    assert (error["code"], error["field"], error["message"]) == (code, field, grpc_message)
    assert answer.headers["x-request-id"] == prefix

    # A refused request never touches the success-rate store.
    left = server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(prefix=prefix), timeout=5)
    assert list(left.tasks) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b'{"trajectories": 3}', "body"),
        (b'{"noSuchField": 1}', "body"),
        (b"\xff\xfe", "body"),
    ],
)
def test_rest_body_that_is_not_a_request(server: ServerProcess, body: bytes, field: str) -> None:
    answer = httpx.post(f"{server.http_url}/v1/advantages", content=body, timeout=10)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field
    assert "Traceback" not in answer.text


def test_rest_query_parameter_errors_name_the_parameter(server: ServerProcess) -> None:
    answer = httpx.get(f"{server.http_url}/v1/tasks", params={"page_size": "-3"}, timeout=5)
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "page_size"
