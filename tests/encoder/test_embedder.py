"""The Embedder on the real model: dedup, LRU, micro-batches and concurrent callers give the
plain path's embeddings (and so its advantages); the shared Redis cache across two instances;
Redis down; readiness, metrics and bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from proxmo.core import (
    StepBatch,
    TrajectoryInput,
    compute_advantages,
    dense_features,
    resolve_config,
)
from proxmo.core.config import Similarity
from proxmo.encoder import Embedder, EncoderSettings, create_embedder
from proxmo.encoder.cache import shared_cache_key
from proxmo.encoder.torch_backend import TorchBackend

from .alfworld_states import alfworld_groups
from .conftest import TEST_THREADS, delete_keys, run

# Embeddings of one text computed in batches of different shapes differ by float32 rounding
# only (measured: <= 1.6e-7 per component) ...
EMBED_ATOL = 1e-6
# ... which PSA (softmax of cosines / tau = 0.05) turns into advantage differences of ~1e-7
# (advantages here reach ~1.5).
ADVANTAGE_ATOL = 1e-6
# fp16 shared-cache values: each component within 2^-11 relative; measured cosine to the fresh
# vector >= 0.99999997 and advantage differences ~1.2e-5.
FP16_COSINE = 0.999999
FP16_ADVANTAGE_ATOL = 2e-4


def value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


def small_batch(nonce: str = "") -> StepBatch:
    """2 groups x 4 trajectories x 8 steps of ALFWorld-like states (many repeated)."""
    trajs = []
    for g, group in enumerate(alfworld_groups(2, 4, 8, seed=7)):
        for k, states in enumerate(group):
            rewards = [0.0] * (len(states) - 1) + [float((g + k) % 2)]
            trajs.append(TrajectoryInput(
                trajectory_id=f"g{g}t{k}", group_id=f"g{g}", task_id=f"task{g}",
                states=[s + nonce for s in states], rewards=rewards,
                invalid=[False] * len(states),
            ))
    return StepBatch.from_trajectories(trajs)


def advantages(batch: StepBatch, unique: np.ndarray, row_index: np.ndarray) -> np.ndarray:
    cfg = resolve_config("proxmo", default_similarity=Similarity.ENCODER)
    features = dense_features(unique, row_index)
    return compute_advantages(batch, cfg, features=features).advantages


def plain_path(backend: TorchBackend, batch: StepBatch) -> np.ndarray:
    """Every step row encoded, no dedup, no cache, one big batch: the reference."""
    row_texts = [batch.states[i] for i in batch.row_state]
    return backend.encode(row_texts, max_batch_tokens=1 << 20).astype(np.float64)


def make(backend: TorchBackend, **settings: Any) -> tuple[Embedder, CollectorRegistry]:
    registry = CollectorRegistry()
    settings.setdefault("threads", TEST_THREADS)
    return Embedder(backend, EncoderSettings(**settings), registry=registry), registry


def test_cached_deduplicated_batched_and_concurrent_paths_match_the_plain_path(
    cpu_backend: TorchBackend,
) -> None:
    batch = small_batch()
    n_rows = len(batch.row_state)
    assert len(batch.states) < n_rows  # the batch repeats states: dedup has work to do
    plain = plain_path(cpu_backend, batch)
    reference = advantages(batch, plain, np.arange(n_rows))

    async def paths() -> dict[str, np.ndarray]:
        # Tiny token budget: many micro-batches.
        embedder, registry = make(cpu_backend, max_batch_tokens=256)
        out = {"dedup+micro-batched": await embedder.embed(batch.states)}
        assert value(registry, "proxmo_encoder_texts_encoded_total") == len(batch.states)
        assert value(registry, "proxmo_encoder_batch_size_count") > 3
        out["lru"] = await embedder.embed(batch.states)
        assert value(registry, "proxmo_encoder_cache_hits_total", {"cache": "lru"}) == len(
            batch.states
        )
        assert value(registry, "proxmo_encoder_texts_encoded_total") == len(batch.states)
        # Concurrent callers with overlapping texts, on a fresh embedder: encoded together.
        fresh, fresh_registry = make(cpu_backend)
        half = len(batch.states) // 2
        parts = await asyncio.gather(
            fresh.embed(batch.states[:half]),
            fresh.embed(batch.states[half // 2 :]),
            fresh.embed(batch.states[half:]),
        )
        assert value(fresh_registry, "proxmo_encoder_texts_encoded_total") == len(batch.states)
        out["concurrent"] = np.concatenate([parts[0], parts[2]])
        np.testing.assert_array_equal(parts[1], out["concurrent"][half // 2 :])
        # Rows as the engine sees them: each step row of a state text gets that text's vector.
        out["per-row texts"] = await fresh.embed([batch.states[i] for i in batch.row_state])
        await embedder.close()
        await fresh.close()
        return out

    results = run(paths())
    # LRU hits are bit-identical to what the backend produced for the first call.
    np.testing.assert_array_equal(results["lru"], results["dedup+micro-batched"])
    for name, unique in results.items():
        rows = unique if name == "per-row texts" else unique[batch.row_state]
        np.testing.assert_allclose(rows, plain, atol=EMBED_ATOL, err_msg=name)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-12)
        index = np.arange(n_rows) if name == "per-row texts" else batch.row_state
        got = advantages(batch, unique, index)
        np.testing.assert_allclose(got, reference, rtol=0, atol=ADVANTAGE_ATOL, err_msg=name)


def test_dedup_within_a_call_and_order(cpu_backend: TorchBackend) -> None:
    texts = ["You arrive at drawer 1.", "Nothing happens.", "You arrive at drawer 1.", "", "x"]

    async def go() -> None:
        embedder, registry = make(cpu_backend)
        result = await embedder.embed_detailed(texts)
        assert (result.distinct, result.encoded, result.lru_hits) == (4, 4, 0)
        assert result.vectors.shape == (5, 384) and result.vectors.dtype == np.float64
        np.testing.assert_array_equal(result.vectors[0], result.vectors[2])
        assert value(registry, "proxmo_encoder_cache_misses_total") == 4
        expected = cpu_backend.encode(["You arrive at drawer 1.", "Nothing happens.", "", "x"])
        np.testing.assert_allclose(result.vectors[[0, 1, 3, 4]], expected, atol=EMBED_ATOL)
        empty = await embedder.embed([])
        assert empty.shape == (0, 384)
        with pytest.raises(TypeError, match=r"^texts\[1\]: expected a string, got int"):
            await embedder.embed(["ok", 3])  # type: ignore[list-item]
        await embedder.close()

    run(go())


def test_lru_evicts_least_recently_used(cpu_backend: TorchBackend) -> None:
    async def go() -> None:
        embedder, _ = make(cpu_backend, lru_size=2)
        await embedder.embed(["a", "b"])
        await embedder.embed(["a"])  # a is now the most recent
        await embedder.embed(["c"])  # evicts b
        result = await embedder.embed_detailed(["a", "b", "c"])
        assert (result.lru_hits, result.encoded) == (2, 1)
        off, _ = make(cpu_backend, lru_size=0)
        await off.embed(["a"])
        assert (await off.embed_detailed(["a"])).encoded == 1
        await embedder.close()
        await off.close()

    run(go())


def test_shared_redis_cache_across_two_instances(
    cpu_backend: TorchBackend, redis_url: str, nonce: str
) -> None:
    batch = small_batch(f" [{nonce}]")
    texts = list(batch.states)
    keys = [shared_cache_key(cpu_backend.model_sha256, cpu_backend.dtype, t) for t in texts]

    async def go() -> tuple[np.ndarray, np.ndarray]:
        first, first_registry = make(cpu_backend, redis_cache_url=redis_url, redis_cache_ttl_s=600)
        second, second_registry = make(cpu_backend, redis_cache_url=redis_url)
        try:
            fresh = await first.embed(texts)
            assert value(first_registry, "proxmo_encoder_texts_encoded_total") == len(texts)
            result = await second.embed_detailed(texts)
            # The second instance encodes nothing: every text comes from the shared cache.
            assert (result.redis_hits, result.encoded) == (len(texts), 0)
            assert value(second_registry, "proxmo_encoder_texts_encoded_total") == 0
            assert value(second_registry, "proxmo_encoder_cache_hits_total",
                         {"cache": "redis"}) == len(texts)
            # ... and then serves them from its own LRU.
            assert (await second.embed_detailed(texts[:3])).lru_hits == 3
            return fresh, result.vectors
        finally:
            await first.close()
            await second.close()

    try:
        fresh, shared = run(go())
        client = redis.Redis.from_url(redis_url)
        ttl = client.ttl(keys[0])
        raw = client.get(keys[0])
        client.close()
        assert 0 < ttl <= 600
        assert raw is not None and len(raw) == 2 * 384  # fp16 bytes
    finally:
        delete_keys(redis_url, keys)
    np.testing.assert_allclose(np.linalg.norm(shared, axis=1), 1.0, atol=1e-12)
    cos = np.sum(fresh * shared, axis=1)
    assert cos.min() >= FP16_COSINE
    np.testing.assert_allclose(shared, fresh, atol=1e-3)
    reference = advantages(batch, fresh, batch.row_state)
    np.testing.assert_allclose(
        advantages(batch, shared, batch.row_state), reference, rtol=0, atol=FP16_ADVANTAGE_ATOL
    )


def test_redis_down_still_embeds(cpu_backend: TorchBackend) -> None:
    texts = ["You open the fridge 1.", "Nothing happens."]

    async def go() -> None:
        embedder, registry = make(cpu_backend, redis_cache_url="redis://127.0.0.1:1/0")
        vectors = await embedder.embed(texts)
        np.testing.assert_allclose(vectors, cpu_backend.encode(texts), atol=EMBED_ATOL)
        assert value(registry, "proxmo_encoder_cache_errors_total", {"op": "get"}) == 1
        # Backing off: the next call does not try Redis again (no second error, no timeout).
        await embedder.embed(["You arrive at shelf 2."])
        assert value(registry, "proxmo_encoder_cache_errors_total", {"op": "get"}) == 1
        await embedder.close()

    run(go())


def test_malformed_shared_value_is_a_miss(
    cpu_backend: TorchBackend, redis_url: str, nonce: str
) -> None:
    text = f"You arrive at toaster 1. [{nonce}]"
    key = shared_cache_key(cpu_backend.model_sha256, cpu_backend.dtype, text)
    client = redis.Redis.from_url(redis_url)
    client.set(key, b"\x00\x01\x02", ex=60)
    client.close()

    async def go() -> None:
        embedder, registry = make(cpu_backend, redis_cache_url=redis_url)
        result = await embedder.embed_detailed([text])
        assert (result.redis_hits, result.encoded) == (0, 1)
        assert value(registry, "proxmo_encoder_cache_errors_total", {"op": "decode"}) == 1
        await embedder.close()

    try:
        run(go())
        client = redis.Redis.from_url(redis_url)
        repaired = client.get(key)
        client.close()
        assert repaired is not None and len(repaired) == 2 * 384  # overwritten by a good value
    finally:
        delete_keys(redis_url, [key])


def test_create_embedder_warmup_info_and_metrics() -> None:
    async def go() -> None:
        registry = CollectorRegistry()
        embedder = await create_embedder(
            EncoderSettings(backend="torch-cpu", threads=1), registry=registry
        )
        info = embedder.info()
        assert info["ready"] is False
        await embedder.warmup()
        info = embedder.info()
        # The warm-up's second pass measured a first throughput.
        assert info.pop("texts_per_second") > 0.0
        assert info == {
            "model_id": "sentence-transformers/all-MiniLM-L6-v2",
            "model_sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "backend": "torch-cpu",
            "device": "cpu",
            "dtype": "float32",
            "dimension": 384,
            "fallback_reasons": [],
            "ready": True,
        }
        labels = {"backend": "torch-cpu", "device": "cpu", "dtype": "float32",
                  "model_id": "sentence-transformers/all-MiniLM-L6-v2"}
        assert value(registry, "proxmo_encoder_backend_info", labels) == 1
        vectors = await embedder.embed(["You arrive at sofa 1.", "You arrive at sofa 2."])
        assert 0.8 < float(vectors[0] @ vectors[1]) < 1.0
        assert value(registry, "proxmo_encoder_duration_seconds_count") >= 1
        await embedder.close()
        assert embedder.info()["ready"] is False

    run(go())
