"""Fixtures for the store tests: both stores on real backends, and a private redis-server.

The shared Redis is the machine's (``PROXMO_TEST_REDIS_URL``, default 127.0.0.1:6379); every
test gets a fresh random namespace whose keys are deleted afterwards. Fault tests start their own
``redis-server`` on a free port so they can kill it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from proxmo.store import MemoryStore, RedisStore, SuccessRateStore

REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

StoreFactory = Callable[..., SuccessRateStore]


def delete_namespace(url: str, namespace: str) -> None:
    """Deletes every key of ``namespace`` (tasks, index, request claims)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared test Redis; the store tests need it (they fail, loudly, without it)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"the store tests need Redis at {REDIS_URL}: {error}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_namespace(redis_url: str, namespace: str) -> Iterator[str]:
    """This test's namespace on the shared Redis, deleted afterwards."""
    yield namespace
    delete_namespace(redis_url, namespace)


@pytest.fixture
def make_store(store_kind: str, namespace: str, request: pytest.FixtureRequest) -> Iterator[
    StoreFactory
]:
    """A factory of stores of the parametrized kind, on this test's namespace by default.

    Stores must be built inside the test's event loop (Redis connections bind to it); the test
    closes them. Redis keys of every namespace used are deleted at teardown.
    """
    used: set[str] = set()
    url = request.getfixturevalue("redis_url") if store_kind == "redis" else ""

    def make(**kwargs: Any) -> SuccessRateStore:
        kwargs.setdefault("namespace", namespace)
        used.add(kwargs["namespace"])
        if store_kind == "memory":
            return MemoryStore(**kwargs)
        return RedisStore(url, **kwargs)

    yield make
    if url:
        for ns in used:
            delete_namespace(url, ns)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server that a test may SIGKILL and restart on the same port.

    Persistence is append-only with fsync on every write, so a restart after SIGKILL keeps every
    acknowledged write (a production Redis holding training history should run with AOF too);
    without it a restart would lose the history itself, not just the outage's updates.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self._dir), "--logfile", "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
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
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
