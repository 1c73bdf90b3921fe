"""docs/algorithm.md section 5a at a real server: a non-finite result is never answered OK. It fails
as INTERNAL on both doors, is logged at ERROR with its request id, counts in
``proxmo_nonfinite_results_total``, and stores nothing (HISTORY). Accepted inputs cannot reach
it, so the server runs with a fault injected by Python's startup hook (``fault_injection/``)
that lets ``inflate-*`` requests past validation with rewards of 1e308; the real compute workers
and the real in-memory store do the rest.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import StartServer, make_request

FAULT_DIR = Path(__file__).parent / "fault_injection"


def test_a_non_finite_result_is_internal_and_stores_nothing(start_server: StartServer) -> None:
    # a compute worker (as deployed): the error crosses the process boundary; the in-process
    # path is tests/engine/test_numerical_safety.py
    server = start_server("--compute-workers", "1",
                          env={"PYTHONPATH": str(FAULT_DIR),
                               "PROXMO_TEST_FAULT": "inflate-rewards"})
    request = make_request(request_id="inflate-grpc", task_prefix="nf", preset="proxmo",
                           similarity=pb.SIMILARITY_TFIDF)
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.ComputeAdvantages(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "non-finite" in raised.value.details()
    assert "nothing was stored" in raised.value.details()

    request.request_id = "inflate-rest"
    answer = httpx.post(f"{server.http_url}/v1/advantages", timeout=60,
                        content=json_format.MessageToJson(request),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"]["code"] == "INTERNAL"
    assert answer.json()["error"]["request_id"] == "inflate-rest"

    # nothing stored for either request's tasks
    stored = server.stub.GetSuccessRates(
        pb.GetSuccessRatesRequest(task_ids=["nf-0", "nf-1"]), timeout=5)
    assert list(stored.tasks) == []
    assert server.metric("proxmo_nonfinite_results_total") == 2
    assert server.metric("proxmo_rejected_total", reason="internal") == 2
    logs = server.logs()
    for request_id in ("inflate-grpc", "inflate-rest"):
        assert any("non-finite result refused" in line and request_id in line
                   for line in logs.splitlines()), logs[-3000:]

    # the same batch without the fault: answered, stored once, and the server is healthy
    request.request_id = "clean-1"
    response = server.stub.ComputeAdvantages(request, timeout=60)
    assert not response.replayed and len(response.trajectories) == len(request.trajectories)
    stored = server.stub.GetSuccessRates(
        pb.GetSuccessRatesRequest(task_ids=["nf-0", "nf-1"]), timeout=5)
    assert [t.updates for t in stored.tasks] == [1, 1]
    assert httpx.get(f"{server.http_url}/readyz", timeout=5).status_code == 200
    assert server.proc.poll() is None
