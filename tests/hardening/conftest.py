"""Fixtures of the hardening tests: real servers (``tests/server/conftest.py``), a self-signed
certificate made with ``openssl``, and private ``redis-server`` processes a test may kill,
protect with a password or serve over TLS.

Scale knobs (``make soak`` raises them): ``PROXMO_FUZZ_CASES`` (fuzz cases per door, default
120) and ``PROXMO_LOAD_SECONDS`` (length of the load run, default 8).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
from server.conftest import (  # noqa: F401 (start_server is a fixture, re-exported here)
    ServerProcess,
    StartServer,
    free_ports,
    start_server,
)
from support.redis_server import Certificate, RedisServer, delete_namespace

SHARED_REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

FUZZ_CASES = int(os.environ.get("PROXMO_FUZZ_CASES", "120"))
LOAD_SECONDS = float(os.environ.get("PROXMO_LOAD_SECONDS", "8"))


def make_certificate(directory: Path, name: str = "server") -> Certificate:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return Certificate(cert, key)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    return make_certificate(tmp_path_factory.mktemp("tls"))


def https_url(server: ServerProcess) -> str:
    return f"https://localhost:{server.http_port}"


def wait_ready_tls(server: ServerProcess, ca: Path, timeout: float = 60.0) -> None:
    """``ServerProcess.wait_ready`` for a server that speaks TLS (HTTPS and gRPC)."""
    server.wait_ready(timeout, ca=ca)


def exit_of(server: ServerProcess, timeout: float = 30.0) -> int:
    """The exit status of a server expected to stop on its own (bad settings)."""
    return int(server.proc.wait(timeout=timeout))


# --- private redis-server -----------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-plain")
    (tmp_path / "redis-plain").mkdir()
    server.start()
    yield server
    server.kill()


def task_totals(client: redis.Redis, namespace: str, task_ids: Sequence[str]) -> dict[str, int]:
    """``total_trials`` of each task as stored in Redis (0 when absent)."""
    out = {}
    for task_id in task_ids:
        value = client.hget(f"{namespace}:task:{task_id}", "total_trials")
        out[task_id] = int(value) if value is not None else 0
    return out


def assert_replayed_exactly(server: ServerProcess, redis_server: RedisServer, namespace: str,
                            task_ids: Sequence[str], trials: int, timeout: float) -> None:
    """Once Redis is back, the server's buffered updates drain within ``timeout`` s, none is
    dropped, and every task's stored total is exactly ``trials``: none lost, none twice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.metric("proxmo_store_buffered_updates") > 0:
        time.sleep(0.1)
    assert server.metric("proxmo_store_buffered_updates") == 0
    assert server.metric("proxmo_store_buffer_dropped_total") == 0
    client = redis_server.client()
    try:
        assert task_totals(client, namespace, task_ids) == {t: trials for t in task_ids}
    finally:
        client.close()


__all__ = ["Certificate", "RedisServer", "ServerProcess", "StartServer", "delete_namespace",
           "free_ports"]
