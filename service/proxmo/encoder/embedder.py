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
4. the misses go to a batcher, shortest first, in pieces of about ``max_batch_tokens``:
   callers arriving within ``max_wait_s`` of each other (or while the worker is busy) are
   encoded together by ONE worker thread that runs the backend (length-sorted micro-batches,
   see base.py). Each piece's vectors enter the caches as soon as it is encoded, and texts on
   their way are "in flight": another caller needing one awaits it instead of encoding it
   again. Nothing encoded is thrown away: when a caller leaves (cancelled, or its deadline is
   near: DeadlineExceeded, saying how far it got), the running piece is still stored and the
   pieces not started go to the background queue below, so a retry encodes only what is left.

Everything returned is renormalized in float64: x / |x|_2.

``Embedder.prefetch(texts)`` queues texts for embedding in the background (the PrefetchStates
RPC): a loop feeds them to the batcher in small chunks of similar length (shortest first) that
run only while no caller is waiting,
so a caller waits at most one chunk for background work. The queue is bounded in texts
(``lru_size``) and bytes (``prefetch_queue_bytes``). A caller that needs a text still in the
queue takes it out and encodes it at once; one that needs a text of the running chunk awaits it.
Nothing is encoded twice, and results are the same as for a call that found an empty cache.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxmo.errors import DeadlineExceeded

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
# What one queued text is charged beyond the string itself (its dict, heap and future entries),
# for the prefetch queue's byte cap.
QUEUE_ENTRY_OVERHEAD_BYTES = 400
# A caller whose deadline is known is answered this long before it (at most 10 % of its time),
# so that the server's explanation reaches the client before the client gives up by itself.
DEADLINE_MARGIN_S = 0.5
RATE_MIN_TEXTS = 8  # runs smaller than this do not update the measured throughput
RATE_SMOOTHING = 0.2  # weight of the newest run in the throughput's moving average


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
            "dropped: the queue was full; handed_over: left unfinished by a caller that "
            "went away, queued).",
            ["outcome"], registry=registry,
        )
        self.prefetch_queue = Gauge(
            "proxmo_encoder_prefetch_queue",
            "Texts waiting for background embedding (the running chunk included).",
            registry=registry,
        )
        self.prefetch_queue_bytes = Gauge(
            "proxmo_encoder_prefetch_queue_bytes",
            "Bytes charged to the texts waiting for background embedding (capped by "
            "prefetch_queue_bytes).",
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

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items


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


@dataclass(eq=False)
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
        # Measured throughput, distinct texts a second: a moving average over the worker's
        # runs (0.0 until one ran). Published in GetServerInfo so clients can size deadlines.
        self.texts_per_second = 0.0

    def submit(self, texts: list[str], *, background: bool = False) -> _Job:
        """Queue texts for the worker; the job's future gets float32 [len(texts), d].
        ``background`` work runs only while no other caller waits."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="proxmo-encoder-batcher")
        assert self._wakeup is not None
        est = sum(estimated_tokens(t) for t in texts)
        job = _Job(texts, loop.create_future(), est, background)
        self._pending.append(job)
        self._wakeup.set()
        return job

    async def encode(self, texts: list[str], *, background: bool = False) -> np.ndarray:
        return await self.submit(texts, background=background).future

    def withdraw(self, job: _Job) -> bool:
        """Take a job back before the worker starts it: True; False once it runs (or ran)."""
        for k, pending in enumerate(self._pending):
            if pending is job:
                del self._pending[k]
                return True
        return False

    def _observe_rate(self, texts: int, seconds: float) -> None:
        if texts < RATE_MIN_TEXTS or seconds <= 0.0:
            return  # a handful of texts says more about overheads than about throughput
        rate = texts / seconds
        previous = self.texts_per_second
        self.texts_per_second = rate if previous == 0.0 else (
            (1.0 - RATE_SMOOTHING) * previous + RATE_SMOOTHING * rate)

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
                started = time.perf_counter()
                vectors = await loop.run_in_executor(self._executor, self._encode, unique)
                self._observe_rate(len(unique), time.perf_counter() - started)
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
    size: int  # what it is charged against the queue's byte cap


@dataclass(eq=False)
class _Piece:
    """Texts sent to the worker as one job. Each text's ``done`` future is its in-flight entry:
    True once its vector is in the LRU, False if the job failed."""

    texts: list[str]
    hashed: list[str]
    done: list[asyncio.Future[bool]]
    job: _Job
    vectors: list[np.ndarray] | None = None  # float32 rows, once the worker is through
    write: asyncio.Task[None] | None = None  # the shared-cache write of those rows


def token_pieces(texts: Sequence[str], budget: int) -> list[list[int]]:
    """Indices of ``texts``, shortest first, cut into runs of about ``budget`` estimated
    tokens (at least one text each): similar lengths pad little, and each run is stored as
    soon as it is encoded."""
    pieces: list[list[int]] = []
    tokens = 0
    for i in sorted(range(len(texts)), key=lambda k: len(texts[k])):
        cost = estimated_tokens(texts[i])
        if not pieces or (pieces[-1] and tokens + cost > budget):
            pieces.append([])
            tokens = 0
        pieces[-1].append(i)
        tokens += cost
    return pieces


def queue_charge(text: str) -> int:
    """Bytes a queued text is charged: the string object plus the queue's bookkeeping."""
    return sys.getsizeof(text) + QUEUE_ENTRY_OVERHEAD_BYTES


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
        # Texts on their way into the LRU (a caller's pieces, the running background chunk),
        # keyed by text hash: whoever needs one of them awaits it instead of encoding it again.
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        self._writes: set[asyncio.Task[None]] = set()  # shared-cache writes under way
        # Background embedding (prefetch and what callers left unfinished), keyed by text hash.
        # At most lru_size texts wait (more would evict each other before any batch used them)
        # and at most prefetch_queue_bytes of them (texts may be long).
        # Chunks are taken shortest first (a heap of (length, seq, hash); entries a caller has
        # taken out are skipped when popped), so each chunk holds texts of similar length:
        # taking them in arrival order pads short texts to long ones, measured 2x slower.
        self._queue: dict[str, _Queued] = {}
        self._queue_bytes = 0
        self._by_length: list[tuple[int, int, str]] = []
        self._sequence = itertools.count()
        self._running_chunk = 0
        self.metrics.prefetch_queue.set_function(lambda: len(self._queue) + self._running_chunk)
        self.metrics.prefetch_queue_bytes.set_function(lambda: self._queue_bytes)
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
            "texts_per_second": self._batcher.texts_per_second,
        }

    def cached(self, text: str) -> bool:
        """Whether the in-process cache holds ``text``'s vector."""
        return (self.backend.model_sha256, text_hash(text)) in self._lru

    @property
    def texts_per_second(self) -> float:
        """Measured encoder throughput (distinct texts a second; 0.0 until measured)."""
        return self._batcher.texts_per_second

    async def warmup(self) -> None:
        """One end-to-end pass through the batcher and worker thread (the backend itself was
        warmed over every shape bucket when the chain accepted it), a second one to measure a
        first throughput (on the probe texts but the two longest, which would pad the rest to
        256 tokens; real work replaces it); then ready."""
        await self._batcher.encode(list(PROBE_TEXTS))
        self._batcher.texts_per_second = 0.0  # the first pass paid one-time costs
        await self._batcher.encode(sorted(PROBE_TEXTS, key=len)[:-2])
        self._info.ready = True

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float64 [len(texts), d], rows L2-normalized, in the order of ``texts``."""
        return (await self.embed_detailed(texts)).vectors

    async def embed_detailed(
        self, texts: Sequence[str], *, deadline: float | None = None
    ) -> EmbedResult:
        """As ``embed``, with where the vectors came from. ``deadline`` (time.monotonic()):
        when the encoding cannot finish before it, DeadlineExceeded is raised shortly before
        it, saying how far the encoding got and what would fix it. Nothing encoded is ever
        lost: each piece enters the caches as soon as it is encoded, and what a caller that
        left (deadline, cancellation) had not started is finished in the background."""
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
            encoded = await self._encode_missing(distinct, hashed, missing, found, deadline)

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

    async def _encode_missing(
        self, distinct: list[str], hashed: list[str], missing: list[int],
        found: list[np.ndarray | None], deadline: float | None,
    ) -> int:
        """Fill ``found[i]`` for each i in ``missing``; returns how many texts this call sent
        to the encoder. Texts in flight (another caller's piece, the running background chunk)
        are awaited; texts in the background queue are taken out and encoded now, with the
        rest, in pieces of about ``max_batch_tokens``."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        awaited: dict[int, asyncio.Future[bool]] = {}
        fresh: list[int] = []
        done: list[asyncio.Future[bool]] = []
        for i in missing:
            running = self._inflight.get(hashed[i])
            if running is not None:
                awaited[i] = running
                continue
            entry = self._unqueue(hashed[i])
            fresh.append(i)
            done.append(entry.done if entry is not None else loop.create_future())
        runs = token_pieces([distinct[i] for i in fresh], self.settings.max_batch_tokens)
        pieces = [
            self._submit([distinct[fresh[k]] for k in run], [hashed[fresh[k]] for k in run],
                         [done[k] for k in run], background=False)
            for run in runs
        ]
        waits: set[asyncio.Future[Any]] = {p.job.future for p in pieces}
        waits.update(awaited.values())
        try:
            if waits:
                # asyncio.wait never cancels what it waits for: a caller that leaves leaves
                # the pieces to run (or to be handed to the background, below).
                _, unfinished = await asyncio.wait(waits, timeout=_time_left(deadline))
                if unfinished:
                    raise DeadlineExceeded(self._deadline_message(
                        missing, pieces, awaited, time.monotonic() - started,
                        self._abandon(pieces)))
        except asyncio.CancelledError:
            self._abandon(pieces)
            raise
        for run, piece in zip(runs, pieces, strict=True):
            piece.job.future.result()  # the backend's error, if it failed, goes to the caller
            assert piece.vectors is not None
            for k, vector in zip(run, piece.vectors, strict=True):
                found[fresh[k]] = vector
        sha = self.backend.model_sha256
        late = []  # texts of a failed (or since evicted) piece of another caller
        for i, future in awaited.items():
            found[i] = self._lru.get((sha, hashed[i])) if future.result() else None
            if found[i] is None:
                late.append(i)
        encoded = len(fresh)
        if late:
            encoded += await self._encode_missing(distinct, hashed, late, found, deadline)
        writes = [p.write for p in pieces if p.write is not None]
        if writes:  # a fresh replica should find this batch in the shared cache at once
            await asyncio.gather(*(asyncio.shield(w) for w in writes))
        return encoded

    def _submit(self, texts: list[str], hashed: list[str], done: list[asyncio.Future[bool]],
                *, background: bool) -> _Piece:
        for h, future in zip(hashed, done, strict=True):
            self._inflight[h] = future
        piece = _Piece(texts, hashed, done, self._batcher.submit(texts, background=background))
        piece.job.future.add_done_callback(functools.partial(self._piece_done, piece))
        return piece

    def _piece_done(self, piece: _Piece, future: asyncio.Future[np.ndarray]) -> None:
        """On the loop, as soon as the worker is through a piece: its vectors into the LRU, a
        shared-cache write started, every waiter told, whether or not its caller is still
        there."""
        ok = not future.cancelled() and future.exception() is None
        if ok:
            vectors = future.result()
            sha = self.backend.model_sha256
            piece.vectors = [vector.copy() for vector in vectors]  # must not pin the batch
            for h, vector in zip(piece.hashed, piece.vectors, strict=True):
                self._lru.put((sha, h), vector)
            if self._shared is not None:
                piece.write = asyncio.get_running_loop().create_task(
                    self._shared.set_many(piece.hashed, vectors))
                self._writes.add(piece.write)
                piece.write.add_done_callback(self._writes.discard)
        for h, done in zip(piece.hashed, piece.done, strict=True):
            if self._inflight.get(h) is done:
                del self._inflight[h]
            if not done.done():
                done.set_result(ok)

    def _abandon(self, pieces: list[_Piece]) -> tuple[int, int]:
        """The caller is gone (or out of time): pieces the worker has not started go to the
        background queue, the running piece finishes and is stored. Returns (texts queued,
        texts dropped because the queue was full)."""
        queued = dropped = 0
        for piece in pieces:
            if not self._batcher.withdraw(piece.job):
                continue  # running or done: _piece_done stores it
            for text, h, done in zip(piece.texts, piece.hashed, piece.done, strict=True):
                if self._inflight.get(h) is done:
                    del self._inflight[h]
                if self._enqueue(h, text, done):
                    queued += 1
                else:
                    done.set_result(False)
                    dropped += 1
        if queued or dropped:
            self.metrics.prefetch_texts.labels(outcome="handed_over").inc(queued)
            self.metrics.prefetch_texts.labels(outcome="dropped").inc(dropped)
            log.info("a caller left with %d texts not encoded: %d queued for background "
                     "embedding, %d dropped (queue full)", queued + dropped, queued, dropped)
        return queued, dropped

    def _deadline_message(
        self, missing: list[int], pieces: list[_Piece],
        awaited: dict[int, asyncio.Future[bool]], elapsed: float, abandoned: tuple[int, int],
    ) -> str:
        left = sum(len(p.texts) for p in pieces if not p.job.future.done())
        left += sum(not f.done() for f in awaited.values())
        rate = self._batcher.texts_per_second
        need = f", about {left / rate:.0f} s more at the measured {rate:.0f} states/s" \
            if rate > 0 else ""
        queued, dropped = abandoned
        kept = (f"; the {len(missing) - left} encoded are cached and the other "
                f"{left - dropped} continue in the background ({left - queued - dropped} on the "
                f"encoder now, {queued} queued), so a retry of this request continues from there")
        if dropped:
            kept += f" ({dropped} did not fit in the background queue)"
        return (
            f"deadline exceeded while encoding the batch's states: {len(missing) - left} of "
            f"{len(missing)} new distinct states encoded in {elapsed:.1f} s, {left} left"
            f"{need}{kept}. For batches this size, send PrefetchStates as rollouts finish, "
            "give a longer deadline, or use TFIDF similarity"
        )

    # --- background embedding (PrefetchStates) -------------------------------------------

    def _enqueue(self, h: str, text: str, done: asyncio.Future[bool]) -> bool:
        """Queue one text for background embedding; False when the queue is full."""
        size = queue_charge(text)
        if (len(self._queue) >= self._queue_capacity
                or self._queue_bytes + size > self.settings.prefetch_queue_bytes):
            return False
        self._queue[h] = _Queued(text, done, size)
        self._queue_bytes += size
        heapq.heappush(self._by_length, (len(text), next(self._sequence), h))
        self._start_prefetch_loop()
        return True

    def _unqueue(self, h: str) -> _Queued | None:
        entry = self._queue.pop(h, None)
        if entry is not None:
            self._queue_bytes -= entry.size
        return entry

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
            entry = self._queue.get(h)
            pending = entry.done if entry is not None else self._inflight.get(h)
            if pending is not None:
                waiting.append(pending)
            elif self._lru.get((sha, h)) is not None:
                cached += 1
            else:
                done: asyncio.Future[bool] = loop.create_future()
                if self._enqueue(h, text, done):
                    waiting.append(done)
                else:
                    dropped += 1
        queued = len(distinct) - cached - dropped
        for outcome, count in (("cached", cached), ("queued", queued), ("dropped", dropped)):
            if count:
                self.metrics.prefetch_texts.labels(outcome=outcome).inc(count)
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
            self._unqueue(h)
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
            chunk = self._take_chunk()
            for h, entry in chunk.items():
                self._inflight[h] = entry.done
            self._running_chunk = len(chunk)
            try:
                await self._embed_chunk(chunk)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a hint failed; the batch will encode them
                self.metrics.prefetch_errors.inc()
                log.exception("background embedding of %d texts failed", len(chunk))
            finally:
                for h, entry in chunk.items():
                    if self._inflight.get(h) is entry.done:
                        del self._inflight[h]
                    if not entry.done.done():
                        entry.done.set_result(False)
                self._running_chunk = 0

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
                    chunk[h].done.set_result(True)
            hashed = [h for h, vector in zip(hashed, hits, strict=True) if vector is None]
        if hashed:
            piece = self._submit([chunk[h].text for h in hashed], hashed,
                                 [chunk[h].done for h in hashed], background=True)
            await piece.job.future

    async def close(self) -> None:
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            try:
                await self._prefetch_task
            except asyncio.CancelledError:
                pass
            self._prefetch_task = None
        for entry in self._queue.values():
            if not entry.done.done():
                entry.done.set_result(False)
        self._queue.clear()
        self._queue_bytes = 0
        self._by_length.clear()
        await self._batcher.close()  # fails every job left: their waiters are told
        for done in list(self._inflight.values()):
            if not done.done():
                done.set_result(False)
        self._inflight.clear()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._shared is not None:
            await self._shared.close()
        self._info.ready = False
        if self._owns_backend:
            self.backend.close()


def _time_left(deadline: float | None) -> float | None:
    """Seconds to wait for the encoder before answering a caller with ``deadline``: up to
    DEADLINE_MARGIN_S (at most 10 % of the time left) before it."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    return max(0.0, left - min(DEADLINE_MARGIN_S, 0.1 * left))


async def create_embedder(
    settings: EncoderSettings, *, registry: CollectorRegistry | None = None
) -> Embedder:
    """Load the model and pick a backend (off the event loop: seconds on CPU, minutes for a
    first TensorRT build), then wrap it. Call ``warmup()`` before reporting ready."""
    backend, failures = await asyncio.to_thread(select_backend, settings)
    return Embedder(backend, settings, registry=registry, fallbacks=failures, owns_backend=True)
