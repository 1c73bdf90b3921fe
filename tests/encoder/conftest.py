"""Encoder test fixtures: the real packaged MiniLM, loaded once per session, on torch CPU.

Importing sentence-transformers costs ~4 s, so the model and the fp32 CPU backend are shared;
each test builds its own cheap Embedder around them (an Embedder belongs to one event loop).
Redis tests use the machine's Redis (``PROXMO_TEST_REDIS_URL``) with texts made unique per run,
and delete their keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
import torch
from proxmo.encoder.model import LoadedModel, load_model
from proxmo.encoder.torch_backend import TorchBackend

T = TypeVar("T")

REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Two threads on a 2-core machine shared with other test runs collapse (OpenMP waits); one
# thread keeps the encoder tests predictable.
TEST_THREADS = 1


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def model() -> LoadedModel:
    torch.set_num_threads(TEST_THREADS)
    return load_model("")


@pytest.fixture(scope="session")
def cpu_backend(model: LoadedModel) -> TorchBackend:
    return TorchBackend(model, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def st_model(model: LoadedModel) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model.path), device="cpu")


@pytest.fixture
def nonce() -> str:
    """Makes texts unique to this test run, so a shared Redis holds nothing for them yet."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"the shared-cache tests need Redis at {REDIS_URL}: {error}")
    finally:
        client.close()
    yield REDIS_URL


def delete_keys(url: str, keys: list[str]) -> None:
    client = redis.Redis.from_url(url)
    try:
        if keys:
            client.delete(*keys)
    finally:
        client.close()
