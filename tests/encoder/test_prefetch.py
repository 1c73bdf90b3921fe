"""Background embedding (``Embedder.prefetch``, the PrefetchStates RPC) on the real model:
prefetched texts serve a later batch from the cache with the same advantages; a caller never
waits behind the background queue; nothing is encoded twice; the queue is bounded."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from proxmo.encoder.torch_backend import TorchBackend

from .conftest import run
from .test_embedder import ADVANTAGE_ATOL, advantages, make, plain_path, small_batch, value


def test_prefetched_batch_is_served_from_the_cache_with_the_same_advantages(
    cpu_backend: TorchBackend,
) -> None:
    batch = small_batch()
    plain = plain_path(cpu_backend, batch)
    reference = advantages(batch, plain, np.arange(len(batch.row_state)))

    async def go() -> tuple[np.ndarray, int]:
        embedder, registry = make(cpu_backend)
        # As a rollout loop sends them: one trajectory's states at a time, duplicates included.
        rows = [batch.states[i] for i in batch.row_state]
        first = await embedder.prefetch(rows[:8])
        assert first.distinct == len(set(rows[:8]))
        assert first.queued == first.distinct and first.cached == first.dropped == 0
        result = await embedder.prefetch(rows, wait=True)
        assert result.distinct == len(batch.states)
        assert result.cached + result.queued == result.distinct
        assert value(registry, "proxmo_encoder_prefetch_queue") == 0
        again = await embedder.prefetch(rows)
        assert again.cached == len(batch.states) and again.queued == 0
        embedded = await embedder.embed_detailed(batch.states)
        assert embedded.encoded == 0 and embedded.lru_hits == len(batch.states)
        encoded = value(registry, "proxmo_encoder_texts_encoded_total")
        await embedder.close()
        return embedded.vectors, int(encoded)

    unique, encoded = run(go())
    assert encoded == len(batch.states)  # each distinct text went through the model once
    got = advantages(batch, unique, batch.row_state)
    np.testing.assert_allclose(got, reference, rtol=0, atol=ADVANTAGE_ATOL)


def test_a_caller_is_not_queued_behind_background_work(cpu_backend: TorchBackend) -> None:
    """A long background queue is running; a batch that arrives meanwhile is answered after
    at most the running chunk, long before the queue is through. Its texts still in the queue
    are taken out and encoded once, with the batch."""
    background = [f"You arrive at shelf {i}. On the shelf {i}, you see a vase {i % 7}, and a "
                  f"book {i % 5}." for i in range(600)]
    caller = [f"You open the fridge {i}. The fridge {i} is open. In it, you see a egg {i}."
              for i in range(6)] + background[-4:]  # 4 texts from the end of the queue

    async def go() -> None:
        embedder, registry = make(cpu_backend)
        queued = await embedder.prefetch(background)
        assert queued.queued == len(background)
        await asyncio.sleep(0.05)  # the first chunk is on the worker
        started = time.perf_counter()
        result = await embedder.embed_detailed(caller)
        caller_s = time.perf_counter() - started
        left = value(registry, "proxmo_encoder_prefetch_queue")
        assert left > len(background) / 2, f"the caller waited for the queue ({left} left)"
        assert result.encoded == len(caller)
        finished = await embedder.prefetch(background, wait=True)
        background_s = time.perf_counter() - started
        assert finished.queued + finished.cached == len(background)
        assert caller_s < background_s / 3, (caller_s, background_s)
        # every text went through the model exactly once
        assert value(registry, "proxmo_encoder_texts_encoded_total") == len(background) + 6
        await embedder.close()

    run(go())


def test_a_batch_waits_for_its_texts_in_the_running_chunk(cpu_backend: TorchBackend) -> None:
    texts = [f"You pick up the mug {i} from the countertop {i % 3}." for i in range(40)]

    async def go() -> None:
        embedder, registry = make(cpu_backend)
        await embedder.prefetch(texts)
        await asyncio.sleep(0.01)  # the one chunk (40 short texts) is running
        result = await embedder.embed_detailed(texts)
        assert result.encoded == 0  # awaited the chunk instead of encoding again
        assert value(registry, "proxmo_encoder_texts_encoded_total") == len(texts)
        await embedder.close()

    run(go())


def test_the_queue_is_bounded_by_the_cache_size(cpu_backend: TorchBackend) -> None:
    async def go() -> None:
        embedder, registry = make(cpu_backend, lru_size=10)
        result = await embedder.prefetch([f"state number {i}" for i in range(25)])
        assert result.queued == 10 and result.dropped == 15
        assert value(registry, "proxmo_encoder_prefetch_texts_total",
                     {"outcome": "dropped"}) == result.dropped
        none, _ = make(cpu_backend, lru_size=0)
        nothing = await none.prefetch(["a", "b"])
        assert nothing.dropped == 2 and nothing.queued == 0
        await embedder.close()
        await none.close()

    run(go())


def test_closing_releases_waiting_prefetch_callers(cpu_backend: TorchBackend) -> None:
    texts = [f"You arrive at drawer {i}. The drawer {i} is closed." for i in range(300)]

    async def go() -> None:
        embedder, _ = make(cpu_backend)
        waiter = asyncio.create_task(embedder.prefetch(texts, wait=True))
        await asyncio.sleep(0.05)
        await embedder.close()
        try:
            await asyncio.wait_for(waiter, 10)
        except RuntimeError as error:
            assert "could not be embedded" in str(error)
        else:
            raise AssertionError("a caller waiting on a closed encoder must be told")

    run(go())


def test_background_chunks_hold_texts_of_similar_length(cpu_backend: TorchBackend) -> None:
    """Texts arrive in random length order; chunks are taken shortest first, so micro-batches
    carry little padding (in arrival order, short texts were padded to long ones: 2x slower)."""
    rng = np.random.default_rng(3)
    words = "the mug is on a countertop near the sinkbasin and a fridge".split()
    texts = [" ".join(rng.choice(words, size=int(n))) + f" {i}"
             for i, n in enumerate(rng.integers(1, 60, size=400))]

    async def go() -> float:
        embedder, registry = make(cpu_backend)
        await embedder.prefetch(texts, wait=True)
        padded = value(registry, "proxmo_encoder_batch_tokens_sum")
        await embedder.close()
        return padded

    padded = run(go())
    real = sum(len(ids) for ids in cpu_backend.tokenizer.token_ids(texts))
    # Measured: 1.17x the real tokens (one length-sorted call over all 400 texts: 1.16x);
    # chunks in arrival order: 1.93x.
    assert padded <= 1.25 * real, f"{padded} padded tokens for {real} real ones"
