"""Bearer-token access control on a real server: wrong or missing tokens get UNAUTHENTICATED /
401 and do no work; probes stay open; tokens never show in logs or GetServerInfo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from proxmo_client import PermissionDeniedError, ProxmoClient, UnauthenticatedError
from proxmo_client.v1 import proxmo_pb2 as pb
from server.conftest import make_request, unique
from support.proxmo_server import metric_value

from hardening.conftest import ServerProcess, StartServer, exit_of

TOKEN = "tok-Zq8x1vN3pL0s9dKe"
METRICS_TOKEN = "scrape-7Hf2mQ9rT4wY"
BAD_HEADERS: list[tuple[str, dict[str, str]]] = [
    ("missing", {}),
    ("wrong token", {"authorization": "Bearer not-the-token"}),
    ("token without scheme", {"authorization": TOKEN}),
    ("other scheme", {"authorization": f"Basic {TOKEN}"}),
    ("token prefix", {"authorization": f"Bearer {TOKEN[:-1]}"}),
    ("metrics token", {"authorization": f"Bearer {METRICS_TOKEN}"}),
]
GOOD = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with an auth token and a metrics token; debug JSON logs (everything logged)."""
    with ServerProcess(
        ["--auth-token", TOKEN, "--metrics-token", METRICS_TOKEN, "--log-format", "json",
         "--log-level", "debug"],
        tmp_path_factory.mktemp("auth") / "server.log",
    ) as server:
        server.wait_ready()  # /readyz and gRPC health are open: probes carry no credentials
        yield server


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """``ServerProcess.metric`` through the metrics token."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=5,
                     headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    return metric_value(text, name, **labels)


def history_request(prefix: str) -> pb.ComputeAdvantagesRequest:
    """A batch that writes the success-rate store (HISTORY, not a dry run)."""
    return make_request(task_prefix=prefix, request_id=f"{prefix}-req",
                        success_rate_source=pb.SUCCESS_RATE_SOURCE_HISTORY)


def grpc_calls(server: ServerProcess, prefix: str) -> dict[str, object]:
    """One callable per RPC; each takes the call metadata."""
    stub = server.stub
    request = history_request(prefix)
    return {
        "ComputeAdvantages": lambda md: stub.ComputeAdvantages(request, metadata=md, timeout=10),
        "StreamAdvantages": lambda md: list(stub.StreamAdvantages(iter([request]), metadata=md,
                                                                  timeout=10)),
        "GetSuccessRates": lambda md: stub.GetSuccessRates(
            pb.GetSuccessRatesRequest(prefix=prefix), metadata=md, timeout=10),
        "ResetSuccessRates": lambda md: stub.ResetSuccessRates(
            pb.ResetSuccessRatesRequest(all_tasks=True), metadata=md, timeout=10),
        "GetServerInfo": lambda md: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md,
                                                       timeout=10),
    }


def test_grpc_refuses_every_rpc_without_the_token_and_does_no_work(
    guarded: ServerProcess,
) -> None:
    prefix = unique("auth-grpc")
    rows = metric(guarded, "proxmo_rows_processed_total")
    refused = metric(guarded, "proxmo_rejected_total", reason="unauthenticated")
    calls = grpc_calls(guarded, prefix)
    for case, headers in BAD_HEADERS:
        for rpc, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call(tuple(headers.items()))  # type: ignore[operator]
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (case, rpc)
            assert "bearer token" in caught.value.details()
    # No work: no rows scored, nothing written to the store, nothing reset.
    assert metric(guarded, "proxmo_rows_processed_total") == rows
    assert metric(guarded, "proxmo_rejected_total", reason="unauthenticated") == \
        refused + len(BAD_HEADERS) * len(calls)
    assert metric(guarded, "proxmo_requests_total", transport="grpc", rpc="ComputeAdvantages",
                  code="UNAUTHENTICATED") >= len(BAD_HEADERS)
    good = tuple(GOOD.items())
    assert calls["GetSuccessRates"](good).tasks == []  # type: ignore[operator,attr-defined]

    # The right token opens every RPC; the batch is then scored and stored.
    response = calls["ComputeAdvantages"](good)  # type: ignore[operator]
    assert len(response.trajectories) == 8  # type: ignore[attr-defined]
    assert metric(guarded, "proxmo_rows_processed_total") == rows + 24
    stored = calls["GetSuccessRates"](good).tasks  # type: ignore[operator,attr-defined]
    assert sorted(t.task_id for t in stored) == [f"{prefix}-0", f"{prefix}-1"]
    assert len(calls["StreamAdvantages"](good)) == 1  # type: ignore[operator,arg-type]
    assert calls["GetServerInfo"](good).version  # type: ignore[operator,attr-defined]


def test_grpc_health_and_reflection_stay_open(guarded: ServerProcess) -> None:
    health = health_pb2_grpc.HealthStub(guarded.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    replies = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "proxmo.v1.CreditAssignmentService" in names


def test_rest_refuses_without_the_token_before_any_work(guarded: ServerProcess) -> None:
    prefix = unique("auth-rest")
    body = json_format.MessageToJson(history_request(prefix))
    url = guarded.http_url
    rows = metric(guarded, "proxmo_rows_processed_total")
    calls = [
        ("POST", "/v1/advantages", body),
        ("GET", f"/v1/tasks?prefix={prefix}", None),
        ("DELETE", "/v1/tasks", None),
        ("DELETE", f"/v1/tasks/{prefix}-0", None),
        ("GET", "/v1/info", None),
        ("GET", "/metrics", None),
        ("GET", "/no/such/path", None),
    ]
    for case, headers in BAD_HEADERS:
        for method, path, content in calls:
            if path == "/metrics" and case == "metrics token":
                continue  # the one thing the metrics token opens
            answer = httpx.request(method, url + path, content=content, headers=headers,
                                   timeout=10)
            assert answer.status_code == 401, (case, method, path, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            error = answer.json()["error"]
            assert error["code"] == "UNAUTHENTICATED" and error["field"] == "authorization"
            assert error["request_id"] == answer.headers["x-request-id"]
    assert metric(guarded, "proxmo_rows_processed_total") == rows
    tasks = httpx.get(f"{url}/v1/tasks", params={"prefix": prefix}, headers=GOOD, timeout=5)
    assert tasks.status_code == 200 and tasks.json()["tasks"] == []

    done = httpx.post(f"{url}/v1/advantages", content=body, headers=GOOD, timeout=30)
    assert done.status_code == 200 and len(done.json()["trajectories"]) == 8
    # Lower-case scheme is the same scheme (RFC 7235: case-insensitive).
    lower = httpx.get(f"{url}/v1/info", headers={"authorization": f"bearer {TOKEN}"}, timeout=5)
    assert lower.status_code == 200


def test_rest_probes_and_docs_stay_open_and_metrics_take_either_token(
    guarded: ServerProcess,
) -> None:
    for path in ("/livez", "/healthz", "/readyz", "/openapi.json", "/docs"):
        assert httpx.get(guarded.http_url + path, timeout=5).status_code == 200, path
    for token in (TOKEN, METRICS_TOKEN):
        answer = httpx.get(f"{guarded.http_url}/metrics", timeout=5,
                           headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and "proxmo_requests_total" in answer.text


def test_tokens_never_appear_in_logs_or_server_info(guarded: ServerProcess) -> None:
    # Exercise every path that logs: refusals, answers, settings at start.
    httpx.get(f"{guarded.http_url}/v1/info", headers={"authorization": "Bearer wrong"},
              timeout=5)
    info = guarded.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=tuple(GOOD.items()),
                                      timeout=5)
    rest_info = httpx.get(f"{guarded.http_url}/v1/info", headers=GOOD, timeout=5).text
    logs = guarded.logs()
    assert "request refused" in logs and '"auth_token":"***"' in logs
    for secret in (TOKEN, METRICS_TOKEN):
        assert secret not in logs
        assert secret.encode() not in info.SerializeToString()
        assert secret not in rest_info


def test_python_client_token_option(guarded: ServerProcess) -> None:
    request = make_request(task_prefix=unique("auth-client"), dry_run=True)
    with ProxmoClient(guarded.grpc_target, token=TOKEN) as client:
        assert len(client.compute_advantages(request).trajectories) == 8
    with ProxmoClient(guarded.grpc_target, token="nope", max_retries=0) as client, \
            pytest.raises(UnauthenticatedError):
        client.compute_advantages(request)


def test_token_file(start_server: StartServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    server = start_server("--auth-token-file", str(token_file))
    request = make_request(dry_run=True)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ComputeAdvantages(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answer = server.stub.ComputeAdvantages(request, metadata=tuple(GOOD.items()), timeout=10)
    assert len(answer.trajectories) == 8
    assert TOKEN not in server.logs()


def test_a_bad_token_file_stops_the_start(start_server: StartServer) -> None:
    """The process exits 2 naming the setting (the other bad settings: test_settings.py)."""
    server = start_server("--auth-token-file", "/nonexistent/token", wait=False)
    assert exit_of(server) == 2
    assert "auth_token_file: cannot read /nonexistent/token" in server.logs()


def test_refusals_are_logged_as_json_without_secrets(guarded: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError):
        guarded.stub.GetServerInfo(pb.GetServerInfoRequest(),
                                   metadata=(("authorization", "Bearer leaked-guess-123"),),
                                   timeout=5)
    lines = [json.loads(line) for line in guarded.logs().splitlines() if line.startswith("{")]
    refusals = [line for line in lines if line.get("code") == "UNAUTHENTICATED"]
    assert refusals and all(line["rpc"] for line in refusals)
    assert "leaked-guess-123" not in guarded.logs()


# --- the admin token (destructive calls) --------------------------------------------------------

ADMIN_TOKEN = "adm-Wq4u7Jd1Xc9b"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def _store_two_tasks(server: ServerProcess, prefix: str) -> None:
    request = history_request(prefix)
    request.request_id = unique(prefix)  # a new batch each time, never a replay
    server.stub.ComputeAdvantages(request, metadata=tuple(GOOD.items()), timeout=30)


def _stored(server: ServerProcess, prefix: str) -> list[str]:
    answer = server.stub.GetSuccessRates(pb.GetSuccessRatesRequest(prefix=prefix),
                                         metadata=tuple(GOOD.items()), timeout=10)
    return sorted(t.task_id for t in answer.tasks)


def test_resets_need_the_admin_token_and_trainer_tokens_never_suffice(
    start_server: StartServer,
) -> None:
    server = start_server("--auth-token", TOKEN, "--admin-token", ADMIN_TOKEN)
    prefix = unique("admin")
    _store_two_tasks(server, prefix)
    reset = pb.ResetSuccessRatesRequest(task_ids=[f"{prefix}-0"])
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ResetSuccessRates(reset, metadata=tuple(GOOD.items()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin token" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # no token at all: UNAUTHENTICATED first
        server.stub.ResetSuccessRates(reset, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for path in ("/v1/tasks", f"/v1/tasks/{prefix}-0"):
        answer = httpx.delete(server.http_url + path, headers=GOOD, timeout=10)
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "PERMISSION_DENIED"
    assert _stored(server, prefix) == [f"{prefix}-0", f"{prefix}-1"]  # nothing deleted
    scraped = httpx.get(f"{server.http_url}/metrics", headers=GOOD, timeout=5).text
    assert metric_value(scraped, "proxmo_rejected_total", reason="permission_denied") == 3

    # The admin token deletes, over gRPC, REST and the Python client; it opens the rest too.
    done = server.stub.ResetSuccessRates(reset, metadata=tuple(ADMIN.items()), timeout=10)
    assert done.deleted == 1
    assert httpx.delete(f"{server.http_url}/v1/tasks/{prefix}-1", headers=ADMIN,
                        timeout=10).status_code == 200
    _store_two_tasks(server, prefix)
    with ProxmoClient(server.grpc_target, token=TOKEN) as client:
        with pytest.raises(PermissionDeniedError):
            client.reset_success_rates([f"{prefix}-0"])
        assert client.reset_success_rates([f"{prefix}-0"], admin_token=ADMIN_TOKEN).deleted == 1
    assert httpx.get(f"{server.http_url}/v1/info", headers=ADMIN, timeout=10).status_code == 200
    assert ADMIN_TOKEN not in server.logs()


def test_without_an_admin_token_resets_are_refused_to_everyone(guarded: ServerProcess) -> None:
    reset = pb.ResetSuccessRatesRequest(all_tasks=True)
    with pytest.raises(grpc.RpcError) as caught:
        guarded.stub.ResetSuccessRates(reset, metadata=tuple(GOOD.items()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no admin token" in caught.value.details()
    answer = httpx.delete(f"{guarded.http_url}/v1/tasks", headers=GOOD, timeout=10)
    assert answer.status_code == 403


def test_admin_token_settings(start_server: StartServer) -> None:
    alone = start_server("--admin-token", ADMIN_TOKEN, wait=False)
    assert exit_of(alone) == 2 and "admin_token: needs auth_token" in alone.logs()
    same = start_server("--auth-token", TOKEN, "--admin-token", TOKEN, wait=False)
    assert exit_of(same) == 2 and "admin_token: must differ" in same.logs()
