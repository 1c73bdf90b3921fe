"""Fixtures of the hardening tests: real servers (``tests/server/conftest.py``), a self-signed
certificate made with ``openssl``, and private ``redis-server`` processes a test may kill,
protect with a password or serve over TLS.

Scale knobs (``make soak`` raises them): ``PROXMO_FUZZ_CASES`` (fuzz cases per door, default
120) and ``PROXMO_LOAD_SECONDS`` (length of the load run, default 8).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from server.conftest import (  # noqa: F401 (start_server is a fixture, re-exported here)
    ServerProcess,
    StartServer,
    free_ports,
    start_server,
)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SHARED_REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

FUZZ_CASES = int(os.environ.get("PROXMO_FUZZ_CASES", "120"))
LOAD_SECONDS = float(os.environ.get("PROXMO_LOAD_SECONDS", "8"))


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for ``localhost`` / ``127.0.0.1`` and its key (PEM files)."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


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
    """``ServerProcess.wait_ready`` for a server that speaks HTTPS."""
    context = ssl.create_default_context(cafile=str(ca))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited {server.proc.returncode}:\n{server.logs()}")
        try:
            answer = httpx.get(f"{https_url(server)}/readyz", verify=context, timeout=1)
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server not ready in {timeout} s:\n{server.logs()}")


def exit_of(server: ServerProcess, timeout: float = 30.0) -> int:
    """The exit status of a server expected to stop on its own (bad settings)."""
    return int(server.proc.wait(timeout=timeout))


# --- private redis-server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server that a test may SIGKILL and restart on the same port.

    AOF with fsync on every write (as tests/store/test_store_faults.py): a restart after SIGKILL
    keeps every acknowledged write. Optional ``password`` (requirepass) and ``tls`` (the plain
    port is then closed and only the TLS port listens).
    """

    def __init__(self, directory: Path, *, password: str = "",
                 tls: Certificate | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        self._dir = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.cert}"

    def client(self) -> redis.Redis:
        kwargs: dict[str, object] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
        if self.password:
            kwargs["password"] = self.password
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.cert))
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        command: list[str] = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--appendfsync", "always",
                              "--dir", str(self._dir), "--logfile", ""]
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                        "--tls-ca-cert-file", str(self.tls.cert), "--tls-auth-clients", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline or self._process.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; open connections just die."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=5)
            self._process = None


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


def delete_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


__all__ = ["ServerProcess", "StartServer", "free_ports"]
