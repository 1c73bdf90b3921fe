"""The async front of the encoder: do as little encoding as possible, never block the loop.

``Embedder.embed(texts)`` returns float64 [n, d], rows L2-normalized, in the order of ``texts``:

1. identical texts of the call are looked up once;
2. the in-process LRU (key: model sha256, blake2b-128 of the text) holds what the backend
   produced, so a hit returns exactly what a fresh encode of the same batch returned;
3. the optional shared Redis cache (``proxmo:emb:<sha[:12]>:<dtype>:<text hash>``, fp16 bytes, TTL)
   lets replicas and restarts reuse work; MGET to read, one pipelined SET EX to write. A value
   read back is fp16-rounded (each component within 2^-11 relative; measured cosine to the
   fresh vector >= 0.99999997, ENCODER advantages within ~1e-5) and is renormalized. fp16 (the
   issue's choice) halves Redis memory; results stay exact wherever the LRU or a fresh encode
   serves them. Redis errors never fail a call: logged, counted, encoded locally, Redis skipped
   for a few seconds;
4. the misses go to a batcher: callers arriving within ``max_wait_s`` of each other (or while
   the worker is busy) are encoded together, up to about ``max_batch_tokens``, by ONE worker
   thread that runs the backend (length-sorted micro-batches, see base.py).

Everything returned is renormalized in float64: x / |x|_2.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from .base import PROBE_TEXTS, BackendUnavailable, EncoderBackend
from .chain import select_backend
from .settings import EncoderSettings
from .torch_backend import choose_cpu_threads

log = logging.getLogger("proxmo.encoder")

REDIS_KEY_PREFIX = "proxmo"
REDIS_BACKOFF_S = 5.0  # after a Redis error, skip it this long instead of paying a timeout per call
MAX_WAIT_S = 0.002  # how long a lone caller waits for company


class EncoderMetrics:
    """Encoder metrics, registered on the server's registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache_hits = Counter(
            "proxmo_encoder_cache_hits", "Distinct texts served from a cache.", ["cache"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "proxmo_encoder_cache_misses",
            "Distinct texts of a call found in no cache (sent to the encoder).",
            registry=registry,
        )
        self.cache_errors = Counter(
            "proxmo_encoder_cache_errors",
            "Shared-cache (Redis) operations that failed; the texts were encoded locally.",
            ["op"], registry=registry,
        )
        self.texts_encoded = Counter(
            "proxmo_encoder_texts_encoded",
            "Texts the backend encoded (after deduplication across concurrent callers).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "proxmo_encoder_batch_size", "Texts per backend micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry,
        )
        self.batch_tokens = Histogram(
            "proxmo_encoder_batch_tokens", "Padded tokens (batch x length) per micro-batch.",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=registry,
        )
        self.duration = Histogram(
            "proxmo_encoder_duration_seconds", "Backend time per micro-batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.backend_info = Info(
            "proxmo_encoder_backend", "The active encoder backend.", registry=registry
        )
        self.fallbacks = Counter(
            "proxmo_encoder_fallbacks",
            "Preferred encoder backends that were not used, by reason.",
            ["from_backend", "reason"], registry=registry,
        )

    def observe_batch(self, texts: int, tokens: int, seconds: float) -> None:
        """Called on the worker thread after each micro-batch (prometheus_client is
        thread-safe)."""
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
        self.duration.observe(seconds)


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def shared_cache_prefix(model_sha256: str, dtype: str) -> str:
    """Redis key prefix of one model at one compute precision: replicas running float32 and
    bfloat16 must not serve each other's vectors."""
    return f"{REDIS_KEY_PREFIX}:emb:{model_sha256[:12]}:{dtype}:"


def shared_cache_key(model_sha256: str, dtype: str, text: str) -> str:
    """Redis key of one cached embedding."""
    return shared_cache_prefix(model_sha256, dtype) + text_hash(text)


class _LRU:
    """An in-process LRU of float32 vectors; touched only from the event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        vector = self._items.get(key)
        if vector is not None:
            self._items.move_to_end(key)
        return vector

    def put(self, key: tuple[str, str], vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = vector
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SharedEmbeddingCache:
    """Redis embedding cache shared by replicas: fp16 little-endian bytes under a TTL."""

    def __init__(
        self, url: str, *, ttl_s: int, model_sha256: str, dtype: str, dimension: int,
        metrics: EncoderMetrics,
    ) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._url = url
        self._ttl_s = ttl_s
        self._prefix = shared_cache_prefix(model_sha256, dtype)
        self._dimension = dimension
        self._metrics = metrics
        self._skip_until = 0.0

    def key(self, hashed_text: str) -> str:
        return self._prefix + hashed_text

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, error: BaseException) -> None:
        self._metrics.cache_errors.labels(op=op).inc()
        self._skip_until = time.monotonic() + REDIS_BACKOFF_S
        log.warning(
            "encoder shared cache %s failed (%s: %s); encoding locally, Redis skipped for %.0f s",
            op, type(error).__name__, error, REDIS_BACKOFF_S,
        )

    def decode(self, raw: bytes | str | None) -> np.ndarray | None:
        """fp16 bytes -> float32 unit vector; anything malformed counts as a miss."""
        if raw is None:
            return None
        if not isinstance(raw, bytes) or len(raw) != 2 * self._dimension:
            self._metrics.cache_errors.labels(op="decode").inc()
            return None
        vector = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0.0:
            self._metrics.cache_errors.labels(op="decode").inc()
            return None
        return vector / norm

    async def get_many(self, hashed: Sequence[str]) -> list[np.ndarray | None]:
        if not hashed or not self._available():
            return [None] * len(hashed)
        try:
            raws = await self._client.mget([self.key(h) for h in hashed])
        except Exception as e:  # noqa: BLE001 - any Redis/network error means "encode locally"
            self._failed("get", e)
            return [None] * len(hashed)
        return [self.decode(raw) for raw in raws]

    async def set_many(self, hashed: Sequence[str], vectors: np.ndarray) -> None:
        if not hashed or not self._available():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for h, vector in zip(hashed, vectors, strict=True):
                pipe.set(self.key(h), vector.astype("<f2").tobytes(), ex=self._ttl_s)
            await pipe.execute()
        except Exception as e:  # noqa: BLE001
            self._failed("set", e)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as e:  # noqa: BLE001 - closing a dead connection is not an error
            log.debug("closing the shared cache client: %s", e)


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    est_tokens: int


class _Batcher:
    """Collects concurrent callers' texts and runs the backend on one worker thread."""

    def __init__(
        self, backend: EncoderBackend, *, max_batch_tokens: int, threads: int,
        metrics: EncoderMetrics, max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self._backend = backend
        self._max_batch_tokens = max_batch_tokens
        self._metrics = metrics
        self._max_wait_s = max_wait_s
        # One thread: the backend is not re-entrant, and torch parallelizes inside each batch.
        # torch's thread count is per OS thread once set, so the worker sets its own.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="proxmo-encoder",
            initializer=torch.set_num_threads, initargs=(threads,),
        )
        self._pending: list[_Job] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), d] from the backend."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="proxmo-encoder-batcher")
        assert self._wakeup is not None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        # Rough count for gathering only (~4 characters a token); micro-batches use real counts.
        est = sum(len(t) // 4 + 2 for t in texts)
        self._pending.append(_Job(texts, future, est))
        self._wakeup.set()
        return await future

    def _take_jobs(self) -> list[_Job]:
        jobs: list[_Job] = []
        tokens = 0
        while self._pending and (not jobs or tokens + self._pending[0].est_tokens
                                 <= self._max_batch_tokens):
            job = self._pending.pop(0)
            tokens += job.est_tokens
            jobs.append(job)
        return jobs

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if sum(j.est_tokens for j in self._pending) < self._max_batch_tokens:
                await asyncio.sleep(self._max_wait_s)  # let callers arriving together join
            jobs = [j for j in self._take_jobs() if not j.future.done()]
            if not self._pending:
                self._wakeup.clear()
            if not jobs:
                continue
            try:
                unique = list(dict.fromkeys(t for job in jobs for t in job.texts))
                vectors = await loop.run_in_executor(self._executor, self._encode, unique)
                row = {text: i for i, text in enumerate(unique)}
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(vectors[[row[t] for t in job.texts]])
            except Exception as e:  # noqa: BLE001 - handed to the callers, the worker lives on
                log.exception("encoder batch of %d calls failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._backend.encode(
            texts, max_batch_tokens=self._max_batch_tokens, on_batch=self._metrics.observe_batch
        )
        self._metrics.texts_encoded.inc(len(texts))
        return vectors

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the encoder is closed"))
        self._pending.clear()
        # Wait for a batch still running on the worker before the backend is released.
        await asyncio.to_thread(self._executor.shutdown, True)


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings plus where they came from (for timings and tests)."""

    vectors: np.ndarray  # float64 [n, d]
    distinct: int  # distinct texts in the call
    lru_hits: int
    redis_hits: int
    encoded: int  # distinct texts this call sent to the encoder


@dataclass
class _Info:
    fallback_reasons: list[str] = field(default_factory=list)
    ready: bool = False


class Embedder:
    """Dedup, caches and batching in front of one EncoderBackend. Build it with
    ``await create_embedder(settings)``; use it from one event loop. Built directly around a
    backend (``owns_backend=False``), ``close()`` leaves the backend open for other users."""

    def __init__(
        self,
        backend: EncoderBackend,
        settings: EncoderSettings,
        *,
        registry: CollectorRegistry | None = None,
        fallbacks: Sequence[BackendUnavailable] = (),
        owns_backend: bool = False,
    ) -> None:
        self.backend = backend
        self._owns_backend = owns_backend
        self.settings = settings
        self.metrics = EncoderMetrics(registry if registry is not None else CollectorRegistry())
        self._lru = _LRU(settings.lru_size)
        self._shared = (
            SharedEmbeddingCache(
                settings.redis_cache_url, ttl_s=settings.redis_cache_ttl_s,
                model_sha256=backend.model_sha256, dtype=backend.dtype,
                dimension=backend.dimension,
                metrics=self.metrics,
            )
            if settings.redis_cache_url
            else None
        )
        self._batcher = _Batcher(
            backend, max_batch_tokens=settings.max_batch_tokens,
            threads=choose_cpu_threads(settings.threads), metrics=self.metrics,
        )
        self._info = _Info(fallback_reasons=[str(f) for f in fallbacks])
        for failure in fallbacks:
            self.metrics.fallbacks.labels(from_backend=failure.backend, reason=failure.code).inc()
        self.metrics.backend_info.info(
            {"backend": backend.name, "device": backend.device, "dtype": backend.dtype,
             "model_id": backend.model_id}
        )

    @property
    def dimension(self) -> int:
        return self.backend.dimension

    def info(self) -> dict[str, Any]:
        b = self.backend
        return {
            "model_id": b.model_id,
            "model_sha256": b.model_sha256,
            "backend": b.name,
            "device": b.device,
            "dtype": b.dtype,
            "dimension": b.dimension,
            "fallback_reasons": list(self._info.fallback_reasons),
            "ready": self._info.ready,
        }

    async def warmup(self) -> None:
        """One end-to-end pass through the batcher and worker thread (the backend itself was
        warmed over every shape bucket when the chain accepted it); then ready."""
        await self._batcher.encode(list(PROBE_TEXTS))
        self._info.ready = True

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float64 [len(texts), d], rows L2-normalized, in the order of ``texts``."""
        return (await self.embed_detailed(texts)).vectors

    async def embed_detailed(self, texts: Sequence[str]) -> EmbedResult:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
        index = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        distinct = list(index)
        sha = self.backend.model_sha256
        hashed = [text_hash(t) for t in distinct]
        found: list[np.ndarray | None] = [self._lru.get((sha, h)) for h in hashed]
        lru_hits = sum(v is not None for v in found)
        missing = [i for i, v in enumerate(found) if v is None]

        redis_hits = 0
        if missing and self._shared is not None:
            for i, vector in zip(missing, await self._shared.get_many([hashed[i] for i in missing]),
                                 strict=True):
                if vector is not None:
                    found[i] = vector
                    self._lru.put((sha, hashed[i]), vector)
                    redis_hits += 1
            missing = [i for i in missing if found[i] is None]

        if missing:
            vectors = await self._batcher.encode([distinct[i] for i in missing])
            for i, vector in zip(missing, vectors, strict=True):
                vector = vector.copy()  # an LRU entry must not pin the whole batch array
                found[i] = vector
                self._lru.put((sha, hashed[i]), vector)
            if self._shared is not None:
                await self._shared.set_many([hashed[i] for i in missing], vectors)

        if lru_hits:
            self.metrics.cache_hits.labels(cache="lru").inc(lru_hits)
        if redis_hits:
            self.metrics.cache_hits.labels(cache="redis").inc(redis_hits)
        if missing:
            self.metrics.cache_misses.inc(len(missing))

        dim = self.backend.dimension
        vectors_found = [v for v in found if v is not None]  # every entry is filled by now
        table = np.stack(vectors_found).astype(np.float64) if distinct else np.empty((0, dim))
        table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        rows = np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
        return EmbedResult(
            vectors=table[rows], distinct=len(distinct), lru_hits=lru_hits,
            redis_hits=redis_hits, encoded=len(missing),
        )

    async def close(self) -> None:
        await self._batcher.close()
        if self._shared is not None:
            await self._shared.close()
        self._info.ready = False
        if self._owns_backend:
            self.backend.close()


async def create_embedder(
    settings: EncoderSettings, *, registry: CollectorRegistry | None = None
) -> Embedder:
    """Load the model and pick a backend (off the event loop: seconds on CPU, minutes for a
    first TensorRT build), then wrap it. Call ``warmup()`` before reporting ready."""
    backend, failures = await asyncio.to_thread(select_backend, settings)
    return Embedder(backend, settings, registry=registry, fallbacks=failures, owns_backend=True)
