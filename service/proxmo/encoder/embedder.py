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

``Embedder.prefetch(texts)`` queues texts for embedding in the background (the PrefetchStates
RPC): a loop feeds them to the batcher in small chunks of similar length (shortest first) that
run only while no caller is waiting,
so a caller waits at most one chunk for background work. A caller that needs a text still in the
queue takes it out and encodes it at once; one that needs a text of the running chunk awaits it.
Nothing is encoded twice, and results are the same as for a call that found an empty cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .base import PROBE_TEXTS, BackendUnavailable, EncoderBackend
from .chain import select_backend
from .settings import EncoderSettings
from .torch_backend import choose_cpu_threads

log = logging.getLogger("proxmo.encoder")

REDIS_KEY_PREFIX = "proxmo"
REDIS_BACKOFF_S = 5.0  # after a Redis error, skip it this long instead of paying a timeout per call
MAX_WAIT_S = 0.002  # how long a lone caller waits for company
# Background (prefetch) chunks: small, so that a caller arriving meanwhile waits little
# (~0.4 s of MiniLM on 2 CPU cores; milliseconds on a GPU).
PREFETCH_CHUNK_TOKENS = 2048


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
        self.prefetch_texts = Counter(
            "proxmo_encoder_prefetch_texts",
            "Distinct texts of PrefetchStates calls, by outcome (cached: nothing to do; queued; "
            "dropped: the queue was full).",
            ["outcome"], registry=registry,
        )
        self.prefetch_queue = Gauge(
            "proxmo_encoder_prefetch_queue",
            "Texts waiting for background embedding (the running chunk included).",
            registry=registry,
        )
        self.prefetch_errors = Counter(
            "proxmo_encoder_prefetch_errors",
            "Background chunks that failed (their texts are encoded when a batch needs them).",
            registry=registry,
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
    background: bool = False


def estimated_tokens(text: str) -> int:
    """A rough token count for gathering work (~4 characters a token, plus [CLS]/[SEP]);
    micro-batches use real counts."""
    return len(text) // 4 + 2


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

    async def encode(self, texts: list[str], *, background: bool = False) -> np.ndarray:
        """float32 [len(texts), d] from the backend. ``background`` work runs only while no
        other caller waits."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="proxmo-encoder-batcher")
        assert self._wakeup is not None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        est = sum(estimated_tokens(t) for t in texts)
        self._pending.append(_Job(texts, future, est, background))
        self._wakeup.set()
        return await future

    def _take_jobs(self) -> list[_Job]:
        """Callers' jobs first, in arrival order, up to the token budget; a background job
        only when no caller waits (it runs alone)."""
        callers = [j for j in self._pending if not j.background]
        if not callers:
            return [self._pending.pop(0)] if self._pending else []
        jobs: list[_Job] = []
        tokens = 0
        for job in callers:
            if jobs and tokens + job.est_tokens > self._max_batch_tokens:
                break
            tokens += job.est_tokens
            jobs.append(job)
        taken = {id(j) for j in jobs}
        self._pending = [j for j in self._pending if id(j) not in taken]
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


@dataclass(frozen=True)
class PrefetchResult:
    """What became of the distinct texts of one ``Embedder.prefetch`` call."""

    distinct: int
    cached: int  # already in the in-process cache
    queued: int  # queued now, or already queued or running
    dropped: int  # the queue was full


@dataclass
class _Queued:
    """A text waiting for background embedding; ``done`` is True once it is in the LRU
    (False: its chunk failed)."""

    text: str
    done: asyncio.Future[bool]


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
        # Background embedding (prefetch), keyed by text hash: waiting, and the running chunk.
        # At most lru_size texts wait: more would evict each other before any batch used them.
        # Chunks are taken shortest first (a heap of (length, seq, hash); entries a caller has
        # taken out are skipped when popped), so each chunk holds texts of similar length:
        # taking them in arrival order pads short texts to long ones, measured 2x slower.
        self._queue: dict[str, _Queued] = {}
        self._by_length: list[tuple[int, int, str]] = []
        self._sequence = itertools.count()
        self._running: dict[str, _Queued] = {}
        self.metrics.prefetch_queue.set_function(lambda: len(self._queue) + len(self._running))
        self._queue_capacity = settings.lru_size
        self._queue_ready: asyncio.Event | None = None
        self._prefetch_task: asyncio.Task[None] | None = None
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

        encoded = 0
        if missing:
            # Texts queued for background embedding are taken out and encoded now; texts of
            # the running background chunk are awaited (it ends within one chunk's time).
            promoted = [self._queue.pop(hashed[i]) for i in missing if hashed[i] in self._queue]
            in_chunk = [(i, self._running[hashed[i]].done) for i in missing
                        if hashed[i] in self._running]
            fresh = [i for i in missing if hashed[i] not in self._running]
            encoded_ok = False
            try:
                if fresh:
                    vectors = await self._encode_and_store(
                        [distinct[i] for i in fresh], [hashed[i] for i in fresh])
                    for i, vector in zip(fresh, vectors, strict=True):
                        found[i] = vector
                    encoded += len(fresh)
                encoded_ok = True
            finally:
                for entry in promoted:  # a prefetch(wait=True) caller may be waiting on them
                    entry.done.set_result(encoded_ok)
            for i, done in in_chunk:
                if await asyncio.shield(done):
                    found[i] = self._lru.get((sha, hashed[i]))
            late = [i for i, _ in in_chunk if found[i] is None]  # the chunk failed (or evicted)
            if late:
                vectors = await self._encode_and_store(
                    [distinct[i] for i in late], [hashed[i] for i in late])
                for i, vector in zip(late, vectors, strict=True):
                    found[i] = vector
                encoded += len(late)

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
            redis_hits=redis_hits, encoded=encoded,
        )

    async def _encode_and_store(
        self, texts: list[str], hashed: list[str], *, background: bool = False
    ) -> list[np.ndarray]:
        """Encode on the worker, then fill the LRU and the shared cache; float32 rows."""
        vectors = await self._batcher.encode(texts, background=background)
        sha = self.backend.model_sha256
        rows = [vector.copy() for vector in vectors]  # an LRU entry must not pin the batch
        for h, vector in zip(hashed, rows, strict=True):
            self._lru.put((sha, h), vector)
        if self._shared is not None:
            await self._shared.set_many(hashed, vectors)
        return rows

    # --- background embedding (PrefetchStates) -------------------------------------------

    async def prefetch(self, texts: Sequence[str], *, wait: bool = False) -> PrefetchResult:
        """Queue the texts not yet embedded for background embedding. Returns at once, or with
        ``wait`` once every queued text is embedded (RuntimeError if a chunk failed)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
        loop = asyncio.get_running_loop()
        sha = self.backend.model_sha256
        distinct = list(dict.fromkeys(texts))
        cached = dropped = 0
        waiting: list[asyncio.Future[bool]] = []
        for text in distinct:
            h = text_hash(text)
            entry = self._queue.get(h) or self._running.get(h)
            if entry is not None:
                waiting.append(entry.done)
            elif self._lru.get((sha, h)) is not None:
                cached += 1
            elif len(self._queue) >= self._queue_capacity:
                dropped += 1
            else:
                entry = _Queued(text, loop.create_future())
                self._queue[h] = entry
                heapq.heappush(self._by_length, (len(text), next(self._sequence), h))
                waiting.append(entry.done)
        queued = len(distinct) - cached - dropped
        for outcome, count in (("cached", cached), ("queued", queued), ("dropped", dropped)):
            if count:
                self.metrics.prefetch_texts.labels(outcome=outcome).inc(count)
        if self._queue:
            self._start_prefetch_loop()
        if wait and waiting:
            results = await asyncio.gather(*(asyncio.shield(f) for f in waiting))
            if not all(results):
                raise RuntimeError(
                    f"{results.count(False)} of {len(results)} texts could not be embedded "
                    "(see the server log); they will be encoded when a batch needs them"
                )
        return PrefetchResult(distinct=len(distinct), cached=cached, queued=queued,
                              dropped=dropped)

    def _start_prefetch_loop(self) -> None:
        if self._prefetch_task is None:
            self._queue_ready = asyncio.Event()
            self._prefetch_task = asyncio.get_running_loop().create_task(
                self._prefetch_loop(), name="proxmo-encoder-prefetch")
        assert self._queue_ready is not None
        self._queue_ready.set()

    def _take_chunk(self) -> dict[str, _Queued]:
        """The shortest queued texts, up to PREFETCH_CHUNK_TOKENS (at least one)."""
        budget = min(PREFETCH_CHUNK_TOKENS, self.settings.max_batch_tokens)
        if len(self._by_length) > 2 * len(self._queue) + 1024:  # mostly entries taken out
            self._by_length = [item for item in self._by_length if item[2] in self._queue]
            heapq.heapify(self._by_length)
        chunk: dict[str, _Queued] = {}
        tokens = 0
        while self._by_length:
            h = self._by_length[0][2]
            entry = self._queue.get(h)
            if entry is None:  # taken out by a caller meanwhile
                heapq.heappop(self._by_length)
                continue
            cost = estimated_tokens(entry.text)
            if chunk and tokens + cost > budget:
                break
            heapq.heappop(self._by_length)
            del self._queue[h]
            chunk[h] = entry
            tokens += cost
        return chunk

    async def _prefetch_loop(self) -> None:
        assert self._queue_ready is not None
        while True:
            await self._queue_ready.wait()
            if not self._queue:
                self._by_length.clear()  # only entries callers took out are left
                self._queue_ready.clear()
                continue
            self._running = self._take_chunk()
            ok = False
            try:
                await self._embed_chunk(self._running)
                ok = True
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a hint failed; the batch will encode them
                self.metrics.prefetch_errors.inc()
                log.exception("background embedding of %d texts failed", len(self._running))
            finally:
                for entry in self._running.values():
                    if not entry.done.done():
                        entry.done.set_result(ok)
                self._running = {}

    async def _embed_chunk(self, chunk: dict[str, _Queued]) -> None:
        """Shared cache first, then the backend (at background priority); results to the
        LRU."""
        hashed = list(chunk)
        sha = self.backend.model_sha256
        if self._shared is not None:
            hits = await self._shared.get_many(hashed)
            for h, vector in zip(hashed, hits, strict=True):
                if vector is not None:
                    self._lru.put((sha, h), vector)
                    self.metrics.cache_hits.labels(cache="redis").inc()
            hashed = [h for h, vector in zip(hashed, hits, strict=True) if vector is None]
        if hashed:
            await self._encode_and_store([chunk[h].text for h in hashed], hashed,
                                         background=True)

    async def close(self) -> None:
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            try:
                await self._prefetch_task
            except asyncio.CancelledError:
                pass
            self._prefetch_task = None
        for entry in [*self._queue.values(), *self._running.values()]:
            if not entry.done.done():
                entry.done.set_result(False)
        self._queue.clear()
        self._by_length.clear()
        self._running = {}
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
