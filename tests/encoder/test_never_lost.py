"""Encoding is never thrown away (issue 21), on the real model: each piece of a call enters the
cache as soon as it is encoded; when the caller leaves (cancelled, or its deadline is near), what
it had not started is finished in the background, and a retry encodes only what is left."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from proxmo.encoder import Embedder
from proxmo.encoder.prefetch import queue_charge
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


def test_a_leaving_caller_does_not_leave_another_callers_text_to_the_background(
    cpu_backend: TorchBackend,
) -> None:
    texts = distinct_states(3, seed=24)
    longest = max(texts, key=len)  # in the caller's last piece: pieces go shortest first
    reference = cpu_backend.encode([longest]).astype(np.float64)

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        first = asyncio.create_task(embedder.embed_detailed(texts))
        await until(lambda: encoded(registry) > 0)  # the first piece is through
        second = asyncio.create_task(embedder.embed_detailed([longest]))
        await asyncio.sleep(0.05)  # the second caller awaits the first one's (unstarted) piece
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        result = await second
        # It was encoded for the caller waiting for it, not after the whole background queue
        # (shortest first, the longest text comes last), and only once.
        assert cached(embedder, texts) < len(texts)
        assert result.encoded == 0
        np.testing.assert_allclose(result.vectors, reference, atol=EMBED_ATOL)
        await until(lambda: value(registry, "proxmo_encoder_prefetch_queue") == 0)
        assert encoded(registry) == len(texts) == cached(embedder, texts)
        await embedder.close()

    run(go())


def test_a_caller_waiting_for_a_background_chunk_is_not_queued_behind_later_callers(
    cpu_backend: TorchBackend,
) -> None:
    busy = distinct_states(1, seed=25)  # keeps the worker busy while the chunk is submitted
    later = distinct_states(3, seed=26)  # a caller arriving after the chunk: several pieces
    hint = [f"You arrive at shelf {i}. On the shelf {i}, you see a vase {i}." for i in range(4)]

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        first = asyncio.create_task(embedder.embed(busy))
        await embedder.prefetch(hint)
        await asyncio.sleep(0.005)  # the chunk waits on the worker's queue, as background work
        after = asyncio.create_task(embedder.embed(later))
        await asyncio.sleep(0.005)
        result = await embedder.embed_detailed(hint[:1])  # awaits the chunk
        assert result.encoded == 0
        # Awaited by a caller, the chunk ran in its place, not after every later caller.
        assert not after.done()
        await asyncio.gather(first, after)
        assert encoded(registry) == len({*busy, *later, *hint})  # each text once
        await embedder.close()

    run(go())


def test_closing_fails_a_call_whose_piece_is_on_the_worker(cpu_backend: TorchBackend) -> None:
    texts = distinct_states(3, seed=27)

    async def go() -> None:
        embedder, registry = make(cpu_backend, max_batch_tokens=PIECE_TOKENS)
        call = asyncio.create_task(embedder.embed_detailed(texts))
        await until(lambda: encoded(registry) > 0)  # the next piece is on the worker now
        await embedder.close()
        with pytest.raises(RuntimeError, match="the encoder is closed"):
            await asyncio.wait_for(call, timeout=30)  # told, not left waiting

    run(go())


def test_a_near_deadline_is_answered_with_how_far_encoding_got(cpu_backend: TorchBackend) -> None:
    # 634 texts: about 6 s on one thread of this 2-vCPU machine, so a 2 s deadline always cuts
    # the call short (221 texts took 1.7-2.4 s: the deadline then raced the encoder).
    texts = distinct_states(36, seed=23)

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
