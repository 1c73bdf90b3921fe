"""The contract is language-agnostic: the Node.js client (clients/node, which loads
protos/proxmo/v1/proxmo.proto at run time) gets the same advantages as the Python client from
the same real server, for the same batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from proxmo_client import ProxmoClient

from .conftest import NODE_CLIENT, LiveServer, node_client_ready

STATES = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1.",
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1 and a spraybottle 2.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2 and a mug 1.",
    "You pick up the mug 1 from the countertop 1.",
)


def _batch() -> list[dict[str, Any]]:
    """Two groups of four trajectories, with invalid steps, explicit successes and shared states."""
    out = []
    for g in range(2):
        for i in range(4):
            n = 2 + (i + g) % 4
            states = [STATES[(i * 2 + t + g) % len(STATES)] for t in range(n)]
            rewards = [0.0] * (n - 1) + [1.0 if (i + g) % 2 == 0 else 0.0]
            item: dict[str, Any] = {
                "trajectory_id": f"g{g}-t{i}", "group_id": f"g{g}", "task_id": f"task-{g}",
                "states": states, "rewards": rewards,
                "invalid": [t == 1 and i == 3 for t in range(n)],
            }
            if i == 2:
                item["success"] = True
            out.append(item)
    return out


CASES = [
    pytest.param("proxmo", {}, id="proxmo-default"),
    pytest.param("proxmo", {"similarity": "tfidf", "tau": 0.2, "gamma": 0.9}, id="proxmo-tfidf"),
    pytest.param("paper", {"similarity": "exact"}, id="paper-exact"),
    pytest.param("gigpo", {"step_normalization": "mean"}, id="gigpo"),
    pytest.param("grpo", {}, id="grpo"),
    pytest.param("rloo", {"invalid_action_penalty": 0.5}, id="rloo"),
    pytest.param("hgpo", {"hgpo_history_length": 3, "hgpo_base_group": True}, id="hgpo"),
    pytest.param("graphgpo", {"graph_normalize_distance": True, "episode_weight": 0.5},
                 id="graphgpo"),
]


def _node_compute(node: str, server: LiveServer, batch: dict[str, Any], tmp_path: Path
                  ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(batch))
    return subprocess.run(
        [node, "examples/compute.js", "--target", server.grpc_target, "--input", str(path),
         "--json"],
        cwd=NODE_CLIENT, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(("preset", "config"), CASES)
def test_node_advantages_equal_python(live_server: LiveServer, tmp_path: Path, preset: str,
                                      config: dict[str, Any]) -> None:
    node = node_client_ready()
    trajectories = _batch()
    # dry_run: neither call writes history, so both see the same success rates.
    batch = {"trajectories": trajectories, "preset": preset, "config": config, "dry_run": True}
    result = _node_compute(node, live_server, batch, tmp_path)
    assert result.returncode == 0, result.stderr
    from_node = json.loads(result.stdout)

    with ProxmoClient(live_server.grpc_target) as client:
        from_python = client.compute_advantages(trajectories, preset=preset, dry_run=True,
                                                **config)

    assert [t["trajectory_id"] for t in from_node["trajectories"]] == \
        [t.trajectory_id for t in from_python.trajectories]
    compared = 0
    for node_t, py_t in zip(from_node["trajectories"], from_python.trajectories, strict=True):
        for key in ("advantages", "episode_advantages", "step_advantages", "returns"):
            ours, theirs = node_t[key], list(getattr(py_t, key))
            assert len(ours) == len(theirs) > 0
            assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-12, key
            compared += len(ours)
    assert compared == 4 * sum(len(t["states"]) for t in trajectories)
    # Not a degenerate batch: real, non-zero advantages of both signs came back.
    flat = [a for t in from_node["trajectories"] for a in t["advantages"]]
    assert min(flat) < 0 < max(flat)
    for node_g, py_g in zip(from_node["groups"], from_python.groups, strict=True):
        assert node_g["group_id"] == py_g.group_id
        assert abs(node_g["success_rate"] - py_g.success_rate) <= 1e-12
        for key in ("hgpo_long_history_fraction", "graph_mean_distance",
                    "graph_unreachable_fraction"):
            assert abs(node_g[key] - getattr(py_g, key)) <= 1e-12, key
        assert node_g["num_steps"] == py_g.num_steps
    assert from_node["resolved_config"]["preset"] == from_python.resolved_config.preset == preset


def test_node_reports_bad_input_by_field(live_server: LiveServer, tmp_path: Path) -> None:
    node = node_client_ready()
    bad = _batch()
    bad[3]["rewards"] = ["high"] * len(bad[3]["states"])
    result = _node_compute(node, live_server, {"trajectories": bad}, tmp_path)
    assert result.returncode == 1
    assert "trajectories[3].rewards[0]" in result.stderr


def test_node_relays_server_validation_errors(live_server: LiveServer, tmp_path: Path) -> None:
    node = node_client_ready()
    batch = {"trajectories": _batch(), "config": {"tau": -1.0}, "dry_run": True}
    result = _node_compute(node, live_server, batch, tmp_path)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "config.tau" in result.stderr


def test_node_unit_tests_pass() -> None:
    node = node_client_ready()
    result = subprocess.run([node, "--test", "test/"], cwd=NODE_CLIENT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
