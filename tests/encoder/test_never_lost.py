"""Encoding is never thrown away (issue 21), on the real model: each piece of a call enters the
cache as soon as it is encoded; when the caller leaves (cancelled, or its deadline is near), what
it had not started is finished in the background, and a retry encodes only what is left."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from proxmo.encoder.embedder import Embedder, queue_charge
from proxmo.encoder.torch_backend import TorchBackend
from proxmo.errors import DeadlineExceeded

from .alfworld_states import alfworld_groups
from .conftest import run
from .test_embedder import EMBED_ATOL, make, value

# Small pieces (max_batch_tokens 256: ~10 texts each), so a call is many pieces.
PIECE_TOKENS = 256


def distinct_states(groups: int, seed: int) -> list[str]:
    texts = [s for group in alfworld_groups(groups, 4, 8, seed=seed) for t in group for s in t]
    return list(dict.fromkeys(texts))


def encoded(registry: object) -> int:
    return int(value(registry, "proxmo_encoder_texts_encoded_total"))  # type: ignore[arg-type]


async def until(condition: object, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def cached(embedder: Embedder, texts: list[str]) -> int:
    return sum(embedder.cached(t) for t in texts)


async def cancel_midway(embedder: Embedder, registry: object, texts: list[str],
                        fraction: float) -> int:
    """One call for ``texts``, cancelled once ``fraction`` of them went through the model;
    returns how many had gone through by then."""
    call = asyncio.create_task(embedder.embed_detailed(texts))
    await until(lambda: encoded(registry) >= fraction * len(texts))
    through = encoded(registry)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    return through


def test_a_cancelled_call_keeps_its_pieces_and_the_rest_finishes_in_the_background(
    cpu_backend: TorchBackend,
) -> None:
    texts = distinct_states(3, seed=21)
    reference = cpu_backend.encode(texts).astype(np.float64)

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        through = await cancel_midway(embedder, registry, texts, 0.25)
        # What was not started went to the background queue; every text that had gone through
        # the model is cached (its piece's vectors are stored as soon as the worker is through).
        handed = value(registry, "proxmo_encoder_prefetch_texts_total",
                       {"outcome": "handed_over"})
        assert 0 < handed <= len(texts) - through
        await until(lambda: cached(embedder, texts) >= through, timeout=5)
        await until(lambda: value(registry, "proxmo_encoder_prefetch_queue") == 0)
        assert cached(embedder, texts) == len(texts)
        assert encoded(registry) == len(texts)  # nothing encoded twice
        again = await embedder.embed_detailed(texts)
        assert again.encoded == 0 and again.lru_hits == len(texts)
        np.testing.assert_allclose(again.vectors, reference, atol=EMBED_ATOL)
        await embedder.close()

    run(go())


def test_a_retry_encodes_only_what_is_left(cpu_backend: TorchBackend) -> None:
    texts = distinct_states(3, seed=22)
    reference = cpu_backend.encode(texts).astype(np.float64)

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        through = await cancel_midway(embedder, registry, texts, 0.34)
        await until(lambda: cached(embedder, texts) >= through, timeout=5)
        before = cached(embedder, texts)
        retry = await embedder.embed_detailed(texts)  # at once: takes the queue back
        assert retry.lru_hits >= before
        assert retry.encoded <= len(texts) - before
        assert encoded(registry) == len(texts)  # every text went through the model once
        np.testing.assert_allclose(retry.vectors, reference, atol=EMBED_ATOL)
        await embedder.close()

    run(go())


def test_a_near_deadline_is_answered_with_how_far_encoding_got(cpu_backend: TorchBackend) -> None:
    texts = distinct_states(12, seed=23)

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        await embedder.embed([f"You arrive at sofa {i}." for i in range(12)])  # a first rate
        started = time.monotonic()
        deadline = started + 2.0
        with pytest.raises(DeadlineExceeded) as raised:
            await embedder.embed_detailed(texts, deadline=deadline)
        answered = time.monotonic()
        assert answered < deadline  # the explanation comes before the caller gives up
        message = str(raised.value)
        assert f"of {len(texts)} new distinct states encoded" in message
        assert "continue in the background" in message and "PrefetchStates" in message
        through = encoded(registry) - 12
        assert 0 < through < len(texts)
        await until(lambda: cached(embedder, texts) >= through, timeout=5)
        done = cached(embedder, texts)
        # Progress is monotone: the next attempt starts from what is cached (and the queue).
        result = await embedder.embed_detailed(texts)
        assert result.lru_hits >= done and result.encoded <= len(texts) - done
        assert encoded(registry) == len(texts) + 12
        await embedder.close()

    run(go())


def test_the_background_queue_is_capped_in_bytes(cpu_backend: TorchBackend) -> None:
    long_texts = [f"{i} " + "You see a mug on the countertop. " * 300 for i in range(10)]
    cap = 3 * queue_charge(long_texts[0]) + 10

    async def go() -> None:
        embedder, registry = make(cpu_backend, prefetch_queue_bytes=cap)
        result = await embedder.prefetch(long_texts)
        assert result.queued == 3 and result.dropped == 7
        assert 0 < value(registry, "proxmo_encoder_prefetch_queue_bytes") <= cap
        await embedder.prefetch(long_texts[:3], wait=True)
        assert value(registry, "proxmo_encoder_prefetch_queue_bytes") == 0
        await embedder.close()

    run(go())
