"""The REST side of the real server: probes, metrics, the same answers as gRPC, admin resets."""

from __future__ import annotations

import httpx
import pytest
from google.protobuf import json_format
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, StartServer, make_request, response_dict, unique


def test_liveness_and_readiness(server: ServerProcess) -> None:
    for path in ("/livez", "/healthz"):
        answer = httpx.get(server.http_url + path, timeout=5)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    ready = httpx.get(server.http_url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "checks" not in ready.json()
    verbose = httpx.get(server.http_url + "/readyz?verbose", timeout=5).json()
    checks = {c["name"]: c for c in verbose["checks"]}
    assert set(checks) == {"server", "engine", "store", "encoder"}
    assert checks["store"]["status"] == "ok" and "memory" in checks["store"]["detail"]
    assert checks["encoder"]["status"] == "disabled"


def test_rest_answer_equals_grpc_answer(server: ServerProcess) -> None:
    request = make_request(request_id=unique("rest"), task_prefix=unique("rest"), dry_run=True)
    from_grpc = response_dict(server.stub.ComputeAdvantages(request, timeout=30))
    answer = httpx.post(f"{server.http_url}/v1/advantages",
                        content=json_format.MessageToJson(request), timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert int(body.pop("timing")["numSteps"]) == 24
    assert body == from_grpc
    assert answer.headers["x-request-id"] == request.request_id


def test_snake_case_body_is_accepted(server: ServerProcess) -> None:
    body = {"request_id": unique("snake"), "dry_run": True, "trajectories": [
        {"trajectory_id": "a", "group_id": "g", "steps": [{"state": "s0", "reward": 1.0}]},
        {"trajectory_id": "b", "group_id": "g", "steps": [{"state": "s1", "reward": 0.0}]},
    ]}
    answer = httpx.post(f"{server.http_url}/v1/advantages", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    assert [t["trajectoryId"] for t in answer.json()["trajectories"]] == ["a", "b"]


def test_tasks_and_resets(server: ServerProcess) -> None:
    prefix = unique("tasks")
    server.stub.ComputeAdvantages(make_request(task_prefix=prefix, groups=3), timeout=30)
    listed = httpx.get(f"{server.http_url}/v1/tasks", params={"prefix": prefix}, timeout=5)
    assert listed.status_code == 200
    tasks = listed.json()["tasks"]
    assert [t["taskId"] for t in tasks] == [f"{prefix}-{g}" for g in range(3)]
    assert tasks[0]["successRate"] == pytest.approx(0.5)
    assert tasks[0]["totalTrials"] == "4"  # proto3 JSON: 64-bit integers are strings

    by_id = httpx.get(f"{server.http_url}/v1/tasks",
                      params=[("task_id", f"{prefix}-2"), ("task_id", "nope")], timeout=5)
    assert [t["taskId"] for t in by_id.json()["tasks"]] == [f"{prefix}-2"]

    one = httpx.delete(f"{server.http_url}/v1/tasks/{prefix}-1", timeout=5)
    assert one.status_code == 200 and one.json() == {"deleted": "1"}
    left = httpx.get(f"{server.http_url}/v1/tasks", params={"prefix": prefix}, timeout=5)
    assert [t["taskId"] for t in left.json()["tasks"]] == [f"{prefix}-0", f"{prefix}-2"]

    refused = httpx.get(f"{server.http_url}/v1/tasks", params={"page_token": "not-a-token"},
                        timeout=5)  # the store's own check
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert refused.json()["error"]["field"] == "page_token"


def test_reset_all_and_auth_token(start_server: StartServer) -> None:
    guarded = start_server("--auth-token", "s3cret", "--admin-token", "adm1n")
    token = {"authorization": "Bearer s3cret"}
    guarded.stub.ComputeAdvantages(make_request(task_prefix="x"), timeout=30,
                                   metadata=tuple(token.items()))
    refused = httpx.delete(f"{guarded.http_url}/v1/tasks", timeout=5)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
    wrong = httpx.delete(f"{guarded.http_url}/v1/tasks", timeout=5,
                         headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    trainer = httpx.delete(f"{guarded.http_url}/v1/tasks", timeout=5, headers=token)
    assert trainer.status_code == 403  # resets take the admin token only
    done = httpx.delete(f"{guarded.http_url}/v1/tasks", timeout=5,
                        headers={"authorization": "Bearer adm1n"})
    assert done.status_code == 200 and done.json() == {"deleted": "2"}
    assert httpx.get(f"{guarded.http_url}/v1/tasks", timeout=5,
                     headers=token).json()["tasks"] == []
    # The tokens are never printed.
    assert "s3cret" not in guarded.logs() and "adm1n" not in guarded.logs()


def test_info_matches_grpc(server: ServerProcess) -> None:
    answer = httpx.get(f"{server.http_url}/v1/info", timeout=5)
    assert answer.status_code == 200
    info = pb.GetServerInfoResponse()
    json_format.Parse(answer.text, info)
    assert info == server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def test_body_over_the_message_limit_is_413(start_server: StartServer) -> None:
    small = start_server("--max-message-bytes", "2000")
    body = json_format.MessageToJson(make_request())
    assert len(body) > 2000
    answer = httpx.post(f"{small.http_url}/v1/advantages", content=body, timeout=10)
    assert answer.status_code == 413
    assert answer.json()["error"] == {
        "code": "RESOURCE_EXHAUSTED", "field": "body",
        "message": f"body: {len(body)} bytes exceed the limit of 2000",
        "request_id": answer.headers["x-request-id"],
    }


def test_metrics_names_and_units(server: ServerProcess) -> None:
    server.stub.ComputeAdvantages(make_request(task_prefix=unique("m")), timeout=30)
    httpx.post(f"{server.http_url}/v1/advantages", content=b"{", timeout=5)
    text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    for name in (
        "proxmo_requests_total", "proxmo_request_duration_seconds_bucket",
        "proxmo_inflight_requests", "proxmo_rejected_total", "proxmo_build_info",
        "proxmo_rows_processed_total", "proxmo_groups_processed_total",
        "proxmo_success_rate_source_total", "proxmo_store_duration_seconds_bucket",
    ):
        assert f"\n{name}" in text, name
    assert server.metric("proxmo_requests_total", transport="grpc", rpc="ComputeAdvantages",
                         code="OK") >= 1
    assert server.metric("proxmo_requests_total", transport="http", rpc="ComputeAdvantages",
                         code="INVALID_ARGUMENT") >= 1
    assert server.metric("proxmo_rejected_total", reason="invalid") >= 1
    assert server.metric("proxmo_success_rate_source_total", source="history") >= 2
    assert server.metric("proxmo_inflight_requests") == 0
    assert 'le="0.001"' in text and 'le="30.0"' in text


def test_openapi_docs_are_served(server: ServerProcess) -> None:
    assert httpx.get(f"{server.http_url}/docs", timeout=5).status_code == 200
    spec = httpx.get(f"{server.http_url}/openapi.json", timeout=5).json()
    for path in ("/livez", "/readyz", "/metrics", "/v1/advantages", "/v1/tasks",
                 "/v1/tasks/{task_id}", "/v1/info"):
        assert path in spec["paths"], path


def test_redis_down_is_degraded_but_ready(start_server: StartServer) -> None:
    # Nothing listens on port 1: the store is unreachable from the start (fail-open).
    proc = start_server("--redis-url", "redis://127.0.0.1:1/0")
    verbose = httpx.get(f"{proc.http_url}/readyz?verbose", timeout=5)
    assert verbose.status_code == 200
    store = next(c for c in verbose.json()["checks"] if c["name"] == "store")
    assert store["status"] == "degraded" and store["ok"] is True
    response = proc.stub.ComputeAdvantages(make_request(), timeout=30)
    assert all(g.success_rate_fallback for g in response.groups)
    assert all(g.success_rate_source == pb.SUCCESS_RATE_SOURCE_BATCH for g in response.groups)
    assert proc.metric("proxmo_success_rate_source_total", source="batch_fallback") >= 2
