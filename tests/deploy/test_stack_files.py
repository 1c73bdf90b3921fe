"""The files of the local compose stack (``make deploy-up``), checked without a Docker engine:
the host-network override resolves to the CPU stack on 127.0.0.1 with the ports from the
environment, the Redis and Prometheus Dockerfiles lint clean, stack.sh parses, and
wheelhouse_gaps.py finds what a wheelhouse lacks for another Python. ``make deploy-smoke``
(tests/deploy/stack) runs all of it for real."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from proxmo.server.config import load_settings

from .conftest import ROOT, compose_binary, tool

OVERRIDE = ROOT / "deploy" / "compose" / "host-network.yml"
STACK_SH = ROOT / "deploy" / "docker" / "stack.sh"
GAPS = ROOT / "deploy" / "docker" / "wheelhouse_gaps.py"
PORTS = {"PROXMO_GRPC_PORT": "29051", "PROXMO_HTTP_PORT": "29080", "PROXMO_REDIS_PORT": "29379",
         "PROXMO_PROMETHEUS_PORT": "29090"}


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The resolved model of docker-compose.yml + the override, profile cpu, as stack.sh runs
    it (COMPOSE_FILE, COMPOSE_PROFILES), with ports of our own."""
    result = subprocess.run(
        [compose_binary(), "config", "--format", "json"], capture_output=True, text=True,
        timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "COMPOSE_PROFILES": "cpu", **PORTS,
             "COMPOSE_FILE": f"docker-compose.yml:{OVERRIDE.relative_to(ROOT)}"})
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_only_the_cpu_stack_on_host_networking(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert set(services) == {"proxmo-cpu", "redis", "prometheus"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports") and not service.get("networks"), name
        assert service["image"].startswith("proxmo-local/") and service["pull_policy"] == "never"


def test_ports_come_from_the_environment(stack: dict[str, Any]) -> None:
    server = stack["services"]["proxmo-cpu"]
    settings = load_settings([], {k: v for k, v in server["environment"].items() if v})
    assert settings.host == "127.0.0.1"
    assert (settings.grpc_port, settings.http_port) == (29051, 29080)
    assert settings.redis_url == "redis://127.0.0.1:29379/0"
    redis = stack["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--port") + 1] == "29379"
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-2:] == ["29379", "ping"]
    prometheus = stack["services"]["prometheus"]
    assert "--web.listen-address=127.0.0.1:29090" in prometheus["command"]
    assert "http://127.0.0.1:29090" in prometheus["healthcheck"]["test"]


def test_prometheus_config_that_stack_sh_writes_scrapes_the_rest_port() -> None:
    """stack.sh rewrites deploy/prometheus/prometheus.yml's target for host networking: the
    text it replaces must be there."""
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    assert '"proxmo:8000"' in text and "scrape_interval: 15s" in text
    assert 'proxmo:8000' in STACK_SH.read_text()
    scrape = yaml.safe_load(text.replace('"proxmo:8000"', '"127.0.0.1:29080"'))
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:29080"]


@pytest.mark.parametrize("dockerfile", ["deploy/redis/Dockerfile", "deploy/prometheus/Dockerfile"])
def test_stack_dockerfiles_lint_clean(dockerfile: str) -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / dockerfile).read_text()
    assert "HEALTHCHECK" in text and "\nUSER " in text


def test_stack_sh_parses_and_starts_dockerd_only_without_bridge_or_iptables() -> None:
    subprocess.run(["bash", "-n", str(STACK_SH)], check=True, timeout=30)
    text = STACK_SH.read_text()
    for flag in ("--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
                 "--ip-forward=false", "--data-root", "--exec-root", "--pidfile"):
        assert flag in text, flag
    assert "deb.debian.org" not in text  # the mirror is read from this machine's apt sources
    usage = subprocess.run(["bash", str(STACK_SH)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "up|down|smoke" in usage.stderr


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A minimal wheel: just the METADATA that wheelhouse_gaps.py reads."""
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_wheelhouse_gaps_follows_the_target_python(tmp_path: Path) -> None:
    _wheel(tmp_path, "app", "1.0", ['timeout-backport>=4; python_full_version < "3.11.3"',
                                    "dep>=2", 'extra-only; extra == "test"',
                                    'old-python-only; python_version < "3.8"'])
    _wheel(tmp_path, "dep", "1.5", [])
    markers = {"python_full_version": "3.11.2", "python_version": "3.11", "os_name": "posix",
               "sys_platform": "linux", "platform_machine": "x86_64",
               "platform_python_implementation": "CPython", "implementation_name": "cpython",
               "implementation_version": "3.11.2", "platform_release": "", "platform_system":
               "Linux", "platform_version": ""}
    env = tmp_path / "markers.json"

    def run(**override: str) -> list[str]:
        env.write_text(json.dumps({**markers, **override}))
        result = subprocess.run([sys.executable, str(GAPS), str(tmp_path), str(env)],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.splitlines()

    # dep 1.5 is too old; the backport is needed on 3.11.2 only; extras and other Pythons not.
    assert run() == ["dep>=2", "timeout-backport>=4"]
    assert run(python_full_version="3.11.7") == ["dep>=2"]
    _wheel(tmp_path, "dep", "2.1", [])
    _wheel(tmp_path, "timeout_backport", "4.0.3", [])
    assert run() == []
