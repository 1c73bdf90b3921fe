"""Every RPC of the real server over a real socket; health, reflection, errors, limits."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import (
    CLI_BIN,
    OFFLINE_ENV,
    ServerProcess,
    StartServer,
    make_request,
    response_dict,
    unique,
)

SERVICE = "proxmo.v1.CreditAssignmentService"


def test_compute_advantages_answers_every_trajectory(server: ServerProcess) -> None:
    request = make_request(request_id=unique("req"), task_prefix=unique("t"))
    response = server.stub.ComputeAdvantages(request, timeout=30)
    assert response.request_id == request.request_id
    assert [t.trajectory_id for t in response.trajectories] == [
        t.trajectory_id for t in request.trajectories]
    for sent, got in zip(request.trajectories, response.trajectories, strict=True):
        assert len(got.advantages) == len(sent.steps)
        assert all(math.isfinite(a) for a in got.advantages)
    assert [g.group_id for g in response.groups] == ["g0", "g1"]
    assert all(g.success_rate_source == pb.SUCCESS_RATE_SOURCE_HISTORY for g in response.groups)
    assert response.timing.num_steps == 2 * 4 * 3
    assert response.timing.total_ns > 0
    assert response.resolved_config.preset == "proxmo"
    assert response.resolved_config.similarity == pb.SIMILARITY_TFIDF


def test_grpc_answer_equals_the_cli_answer(server: ServerProcess, tmp_path: Path) -> None:
    # Fresh task ids: the HISTORY both sides start from is empty, so the numbers must agree.
    request = make_request(request_id=unique("cli"), task_prefix=unique("cli"), groups=3)
    path = tmp_path / "request.json"
    path.write_text(json_format.MessageToJson(request))
    cli = subprocess.run(
        [str(CLI_BIN), "compute", "--input", str(path), "--similarity", "tfidf"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV},
    )
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    from_cli.pop("timing")
    from_grpc = response_dict(server.stub.ComputeAdvantages(request, timeout=30))
    assert from_grpc == from_cli


def test_history_is_kept_and_read_back(server: ServerProcess) -> None:
    prefix = unique("hist")
    for i in range(2):
        server.stub.ComputeAdvantages(
            make_request(request_id=f"{prefix}-{i}", task_prefix=prefix), timeout=30)
    by_id = server.stub.GetSuccessRates(
        pb.GetSuccessRatesRequest(task_ids=[f"{prefix}-0", "no-such-task"]), timeout=5)
    assert [t.task_id for t in by_id.tasks] == [f"{prefix}-0"]
    task = by_id.tasks[0]
    assert (task.updates, task.total_trials, task.total_successes) == (2, 8, 4)
    assert task.success_rate == pytest.approx(0.5)
    assert task.last_update_time.seconds > 0

    page1 = server.stub.GetSuccessRates(
        pb.GetSuccessRatesRequest(prefix=prefix, page_size=1), timeout=5)
    assert [t.task_id for t in page1.tasks] == [f"{prefix}-0"] and page1.next_page_token
    page2 = server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(
        prefix=prefix, page_size=1, page_token=page1.next_page_token), timeout=5)
    assert [t.task_id for t in page2.tasks] == [f"{prefix}-1"]


def test_a_store_refusal_is_invalid_argument_naming_the_field(server: ServerProcess) -> None:
    """The store's own checks (the core's ValidationError) answer like any bad field."""
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(page_token="not-a-token"),
                                    timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("page_token: ")


def test_reset_success_rates(server: ServerProcess) -> None:
    prefix = unique("reset")
    server.stub.ComputeAdvantages(make_request(task_prefix=prefix), timeout=30)
    deleted = server.stub.ResetSuccessRates(
        pb.ResetSuccessRatesRequest(task_ids=[f"{prefix}-0"]), timeout=5)
    assert deleted.deleted == 1
    left = server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(prefix=prefix), timeout=5)
    assert [t.task_id for t in left.tasks] == [f"{prefix}-1"]
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ResetSuccessRates(
            pb.ResetSuccessRatesRequest(task_ids=["a"], all_tasks=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("all_tasks: ")


def test_server_info(server: ServerProcess) -> None:
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.version == "0.1.0"
    assert len(info.git_sha) in (0, 40)
    assert info.default_preset == "proxmo"
    assert info.default_similarity == pb.SIMILARITY_TFIDF  # no encoder in this server
    assert pb.SIMILARITY_ENCODER not in info.similarities
    assert {pb.SIMILARITY_TFIDF, pb.SIMILARITY_EXACT} <= set(info.similarities)
    names = [p.name for p in info.presets]
    assert "proxmo" in names and "gigpo" in names
    proxmo_preset = next(p for p in info.presets if p.name == "proxmo")
    assert proxmo_preset.config.similarity == pb.SIMILARITY_TFIDF
    assert info.encoder.backend == "none"
    assert info.limits.max_message_bytes == 64 * 1024 * 1024
    assert info.limits.max_concurrency == 32
    assert info.limits.max_trajectories > 0 and info.limits.max_state_chars > 0
    assert (info.success_rate_store, info.success_rate_namespace) == ("memory", "proxmo")


def test_health_and_reflection(server: ServerProcess) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert server.health("") == serving
    assert server.health(SERVICE) == serving
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    services = {s.name for a in answers for s in a.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= services


def _rich_details(error: grpc.RpcError) -> tuple[list[str], str]:
    """(field violation fields, request id) from grpc-status-details-bin."""
    status = rpc_status.from_call(error)
    assert status is not None
    fields: list[str] = []
    request_id = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
        if detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            info = error_details_pb2.RequestInfo()
            detail.Unpack(info)
            request_id = info.request_id
    return fields, request_id


def test_invalid_argument_carries_a_field_violation(server: ServerProcess) -> None:
    request = make_request(request_id="bad-1")
    request.trajectories[5].steps[1].reward = math.nan
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ComputeAdvantages(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "trajectories[5].steps[1].reward: must be finite, got nan"
    assert _rich_details(caught.value) == (["trajectories[5].steps[1].reward"], "bad-1")


def test_over_the_message_size_limit(start_server: StartServer) -> None:
    small = start_server("--max-message-bytes", "20000")
    request = make_request(groups=8, per_group=8, steps=10)
    assert request.ByteSize() > 20000
    with pytest.raises(grpc.RpcError) as caught:
        small.stub.ComputeAdvantages(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _sized(trajectories: int, steps: int, state: str = "") -> pb.ComputeAdvantagesRequest:
    request = make_request(groups=1, per_group=trajectories, steps=steps)
    if state:
        request.trajectories[1].steps[1].state = state
    return request


def test_request_limits_name_the_field(start_server: StartServer) -> None:
    limited = start_server("--max-trajectories", "6", "--max-steps-per-trajectory", "4",
                           "--max-total-steps", "20", "--max-state-chars", "200")
    cases = [
        (_sized(8, 1), "trajectories", "limit of 6"),
        (_sized(2, 5), "trajectories[0].steps", "limit of 4"),
        (_sized(6, 4), "trajectories", "limit of 20"),
        (_sized(2, 2, "x" * 201), "trajectories[1].steps[1].state", "limit of 200"),
    ]
    for request, field, limit in cases:
        with pytest.raises(grpc.RpcError) as caught:
            limited.stub.ComputeAdvantages(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details().startswith(f"{field}: "), caught.value.details()
        assert limit in caught.value.details()
        assert _rich_details(caught.value)[0] == [field]
    # Within every limit: served.
    assert len(limited.stub.ComputeAdvantages(_sized(6, 3), timeout=10).trajectories) == 6
