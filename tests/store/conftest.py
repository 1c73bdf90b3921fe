"""Fixtures for the store tests: both stores on real backends, and a private redis-server.

The shared Redis is the machine's (``PROXMO_TEST_REDIS_URL``, default 127.0.0.1:6379); every
test gets a fresh random namespace whose keys are deleted afterwards. Fault tests start their own
``redis-server`` on a free port so they can kill it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from proxmo.store import MemoryStore, RedisStore, SuccessRateStore
from support.redis_server import RedisServer, delete_namespace

REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

StoreFactory = Callable[..., SuccessRateStore]


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


async def flush_all(store: RedisStore, seconds: float = 10.0) -> None:
    """Flushes the store's buffer until it is empty (Redis back after a fault); fails if not."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await store.flush():
        assert asyncio.get_running_loop().time() < deadline, "buffer not flushed in time"
        await asyncio.sleep(0.1)
    assert store.buffered_updates == 0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
