"""The verl plugin inside a verl-agent fork (verl 0.3 era): ``fork_verl/`` stands in for the
fork's vendored verl (no registry, no entry points, ``proxmo``/``gigpo`` enum branches,
adjust_batch copies, _balance_batch, a Ray TaskRunner). Each scenario runs in a fresh
interpreter with the stand-in first on the path (``fork_scenarios.py``) against the real
proxmo-server; Ray is a real local Ray. Collected where ray is installed (the trainers venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
PARITY = 1e-4  # the service (float64) against the fork's float32 code


def run_scenario(name: str, target: str, timeout: float = 240) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "fork_verl"), str(HERE)])}
    for variable in ("PROXMO_SERVER", "PROXMO_PRESET", "PROXMO_OVERRIDES", "PROXMO_COPIES",
                     "PROXMO_RETURNS", "PROXMO_TOKEN"):  # fmt: skip
        env.pop(variable, None)
    done = subprocess.run(
        [sys.executable, str(HERE / "fork_scenarios.py"), name, target],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE,
    )  # fmt: skip
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_plugin_before_the_fork_install_never_raises_and_leaves_no_hook(server: Any) -> None:
    out = run_scenario("import_order", server.target)
    assert out["has_registry"] is False
    assert out["wrapped"] and out["install_again"] and out["finders_unchanged"]
    # no server configured: the fork's own branch runs, and says so
    assert out["no_server_computed_by"] == "fork"
    assert any("no server is configured" in w for w in out["no_server_warning"])
    # a bad setting: install() returns False, removes its hook, keeps the earlier settings
    assert out["bad_install"] is False
    assert out["finder_left_after_failure"] is False
    assert out["server_after_failure"] is None
    assert "copies: expected one of merge, count" in out["stderr"]


@pytest.fixture(scope="module")
def numbers(server: Any) -> dict[str, Any]:
    return run_scenario("numbers", server.target)


def test_fork_estimators_equal_the_forks_in_process_answer(numbers: dict[str, Any]) -> None:
    out = numbers["parity"]
    for name, diff in out["max_diff"].items():
        assert out["computed_by"][name] == [None, "fork"], name  # service, then the fork's code
        assert out["max_abs"][name] > 0.3, name  # a batch with real signal
        assert diff < PARITY, (name, diff)
    assert out["returns_are_discounted"]
    assert out["returns_vs_step_rewards"] < 1e-5  # returns = G_t, the fork's step_rewards
    assert out["fork_returns_equal_advantages"]  # returns="advantages": the fork's convention
    assert out["components_max_diff"] < PARITY  # return_components=True


def test_padding_copies_merged_by_default_counted_on_request(numbers: dict[str, Any]) -> None:
    out = numbers["copies"]
    assert out["copies"] >= 10
    for name, diff in out["count"].items():
        assert diff < PARITY, (name, diff)  # copies="count" = the released code
    for name, diff in out["merge"].items():
        assert diff > 1e-2, (name, diff)  # the default differs where copies change statistics
    assert out["merge_vs_direct"] < 1e-6  # merge = the service on the distinct steps


def test_ray_actor_gets_the_wrapper_from_the_setup_hook(server: Any) -> None:
    out = run_scenario("ray", server.target, timeout=400)
    # ray.init without the hook, where a server is configured: a loud warning
    assert out["ray_init_checked"] and out["hookless_env_ok"] is False
    assert any("worker_process_setup_hook" in w for w in out["hookless_warning"])
    assert not any("worker_process_setup_hook" in w for w in out["init_warnings"])
    # the hook installs the wrapper in the actor; the driver's install(server=...) stays there
    assert out["server_unset"] == {"computed_by": "fork", "loaded": True}
    assert out["server_set"]["computed_by"] == "service" and out["server_set"]["loaded"]
    assert out["server_set"]["max_diff_vs_driver"] < 1e-6
