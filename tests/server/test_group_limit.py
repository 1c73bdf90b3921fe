"""--max-group-distinct-states on a real server: both doors refuse a group over it, naming it,
and GetServerInfo lists it."""

from __future__ import annotations

import grpc
import httpx
import pytest
from google.protobuf import json_format
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import ServerProcess, StartServer, make_request, unique


def test_server_info_lists_the_default(server: ServerProcess) -> None:
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.limits.max_group_distinct_states == 1024


def test_both_doors_refuse_a_group_over_the_limit(start_server: StartServer) -> None:
    capped = start_server("--max-group-distinct-states", "3")
    info = capped.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.limits.max_group_distinct_states == 3
    # 2 groups x 4 trajectories x 3 steps: each group has more than 3 distinct state texts
    request = make_request(task_prefix=unique("cap"), preset="paper", dry_run=True)
    details = "trajectories[0].group_id: group 'g0' has "
    with pytest.raises(grpc.RpcError) as caught:
        capped.stub.ComputeAdvantages(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details().startswith(details)
    assert "over the limit of 3" in caught.value.details()
    answer = httpx.post(
        f"{capped.http_url}/v1/advantages", content=json_format.MessageToJson(request), timeout=30
    )
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("RESOURCE_EXHAUSTED", "trajectories[0].group_id")
    # GiGPO has no PSA: the same batch is served
    request.config.preset = "gigpo"
    response = capped.stub.ComputeAdvantages(request, timeout=30)
    assert len(response.trajectories) == len(request.trajectories)
