"""HGPO and GraphGPO through every door of the real server: gRPC, REST and the CLI agree with
the core, the new config fields round-trip, bad values name their field, diagnostics arrive."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from proxmo.core import StepBatch, TrajectoryInput, compute_advantages, resolve_config
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import CLI_BIN, OFFLINE_ENV, ServerProcess, response_dict, unique

# Two groups: the worked example of tests/core/test_hgpo_graphgpo.py and one without success.
PATHS = {
    "g0": [(["s0", "s1", "s2"], [0, 0, 1], [False] * 3),
           (["s0", "s1", "s3"], [0, 0, 0], [False] * 3),
           (["s0", "s4", "s2"], [0, 0, 1], [False, True, False])],
    "g1": [(["s0", "s1"], [0, 0], [False, False]), (["s0", "s2", "s1"], [0, 0, 0], [True] * 3)],
}  # fmt: skip


def _request(preset: str, **config: object) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(
        request_id=unique(preset), dry_run=True, config=pb.EstimatorConfig(preset=preset, **config)
    )
    for group, paths in PATHS.items():
        for k, (states, rewards, invalid) in enumerate(paths):
            trajectory = request.trajectories.add(trajectory_id=f"{group}-{k}", group_id=group)
            for state, reward, bad in zip(states, rewards, invalid, strict=True):
                trajectory.steps.add(state=state, reward=reward, invalid_action=bad)
    return request


def _core(preset: str, **overrides: object) -> np.ndarray:
    trajs = [
        TrajectoryInput(f"{g}-{k}", g, "", states, rewards, invalid)
        for g, paths in PATHS.items()
        for k, (states, rewards, invalid) in enumerate(paths)
    ]
    batch = StepBatch.from_trajectories(trajs)
    return compute_advantages(batch, resolve_config(preset, overrides)).advantages


def _advantages(response: pb.ComputeAdvantagesResponse) -> np.ndarray:
    return np.concatenate([list(t.advantages) for t in response.trajectories])


CASES = [
    ("hgpo", {}),
    ("hgpo", {"hgpo_history_length": 0, "hgpo_alpha": 2.0, "hgpo_base_group": True}),
    ("graphgpo", {}),
    ("graphgpo", {"graph_normalize_distance": True, "episode_weight": 0.0,
                  "graph_success_value": 1.0}),
]  # fmt: skip


@pytest.mark.parametrize(("preset", "config"), CASES)
def test_grpc_and_rest_answer_the_core(
    server: ServerProcess, preset: str, config: dict[str, object]
) -> None:
    request = _request(preset, **config)
    response = server.stub.ComputeAdvantages(request, timeout=30)
    np.testing.assert_allclose(_advantages(response), _core(preset, **config), rtol=0, atol=1e-12)
    resolved = response.resolved_config
    assert resolved.preset == preset
    for name, value in config.items():
        assert getattr(resolved, name) == value, name  # a set 0 / false stays 0 / false
    answer = httpx.post(f"{server.http_url}/v1/advantages",
                        content=json_format.MessageToJson(request), timeout=30)  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    body.pop("timing")
    assert body == response_dict(response)


def test_diagnostics_arrive_per_group(server: ServerProcess) -> None:
    hgpo = server.stub.ComputeAdvantages(_request("hgpo"), timeout=30)
    assert hgpo.groups[0].hgpo_long_history_fraction == pytest.approx(2 / 9)
    assert hgpo.groups[0].graph_mean_distance == 0.0
    graph = server.stub.ComputeAdvantages(_request("graphgpo"), timeout=30)
    first, second = graph.groups
    assert (first.graph_mean_distance, first.graph_unreachable_fraction) == (2.0, 0.2)
    assert (second.graph_mean_distance, second.graph_unreachable_fraction) == (0.0, 1.0)
    assert first.hgpo_long_history_fraction == 0.0


def test_cli_answers_like_grpc(server: ServerProcess, tmp_path: Path) -> None:
    request = _request("graphgpo", graph_normalize_distance=True)
    path = tmp_path / "request.json"
    path.write_text(json_format.MessageToJson(request))
    cli = subprocess.run(
        [str(CLI_BIN), "compute", "--input", str(path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    from_cli.pop("timing")
    assert from_cli == response_dict(server.stub.ComputeAdvantages(request, timeout=30))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"hgpo_history_length": 65}, "config.hgpo_history_length"),
        ({"hgpo_alpha": 40.0}, "config.hgpo_alpha"),
        ({"graph_success_value": -1.0}, "config.graph_success_value"),
        ({"episode_weight": 1e7}, "config.episode_weight"),
    ],
)
def test_bad_values_are_invalid_argument_naming_the_field(
    server: ServerProcess, config: dict[str, object], field: str
) -> None:
    request = _request("hgpo", **config)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ComputeAdvantages(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
    answer = httpx.post(f"{server.http_url}/v1/advantages",
                        content=json_format.MessageToJson(request), timeout=30)  # fmt: skip
    assert answer.status_code == 422 and field in answer.text


def test_server_info_lists_both_presets(server: ServerProcess) -> None:
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    presets = {p.name: p.config for p in info.presets}
    assert presets["hgpo"].estimator == pb.ESTIMATOR_HGPO
    assert presets["hgpo"].hgpo_history_length == 2
    assert presets["graphgpo"].estimator == pb.ESTIMATOR_GRAPHGPO
    assert presets["graphgpo"].gamma == pytest.approx(0.1)
    assert presets["graphgpo"].graph_success_value == 10.0
