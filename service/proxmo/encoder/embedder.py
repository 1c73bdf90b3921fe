"""The async front of the encoder: do as little encoding as possible, never block the loop.

``Embedder.embed(texts)`` returns float64 [n, d], rows L2-normalized, in the order of ``texts``:

1. identical texts of the call are looked up once;
2. the in-process LRU, then the optional shared Redis cache (cache.py);
3. the misses go to the batcher (prefetch.py), shortest first, in pieces of about
   ``max_batch_tokens``, encoded on one worker thread together with other callers' texts.
   Each piece's vectors enter the caches as soon as it is encoded, and texts on their way are
   "in flight": another caller needing one awaits it instead of encoding it again. Nothing
   encoded is thrown away: when a caller leaves (cancelled, or its deadline is near:
   DeadlineExceeded, saying how far it got), the running piece is still stored and the pieces
   not started go to the background queue, so a retry encodes only what is left.

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
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from proxmo.errors import DeadlineExceeded

from .base import PROBE_TEXTS, BackendUnavailable, EncoderBackend
from .cache import EmbeddingLRU, SharedEmbeddingCache, text_hash
from .chain import select_backend
from .metrics import EncoderMetrics
from .prefetch import (
    PREFETCH_CHUNK_TOKENS,
    BackgroundQueue,
    Batcher,
    Piece,
    QueuedText,
    token_pieces,
)
from .settings import EncoderSettings
from .torch_backend import choose_cpu_threads

log = logging.getLogger("proxmo.encoder")

# A caller whose deadline is known is answered this long before it (at most 10 % of its time),
# so that the server's explanation reaches the client before the client gives up by itself.
DEADLINE_MARGIN_S = 0.5


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
        self._lru = EmbeddingLRU(settings.lru_size)
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
        self._batcher = Batcher(
            backend, max_batch_tokens=settings.max_batch_tokens,
            threads=choose_cpu_threads(settings.threads), metrics=self.metrics,
        )
        # Texts on their way into the LRU (a caller's pieces, the running background chunk),
        # keyed by text hash: whoever needs one of them awaits it instead of encoding it again.
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        # How many callers await each in-flight text: a caller that leaves hands those texts
        # to the worker at once, not to the background queue behind every other text.
        self._awaited: Counter[str] = Counter()
        self._writes: set[asyncio.Task[None]] = set()  # shared-cache writes under way
        # Background embedding (prefetch and what callers left unfinished).
        self._queue = BackgroundQueue(
            capacity=settings.lru_size, max_bytes=settings.prefetch_queue_bytes,
            chunk_tokens=min(PREFETCH_CHUNK_TOKENS, settings.max_batch_tokens),
        )
        self._running_chunk = 0
        self._chunk_piece: Piece | None = None  # the running chunk's job, once submitted
        self.metrics.prefetch_queue.set_function(lambda: len(self._queue) + self._running_chunk)
        self.metrics.prefetch_queue_bytes.set_function(lambda: self._queue.bytes)
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
            entry = self._queue.take(hashed[i])
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
        self._awaited.update(hashed[i] for i in awaited)
        chunk = self._chunk_piece
        if chunk is not None and not set(chunk.hashed).isdisjoint(hashed[i] for i in awaited):
            self._batcher.promote(chunk.job)  # no longer background work: a caller waits for it
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
        finally:
            self._awaited.subtract(hashed[i] for i in awaited)
            for i in awaited:
                if self._awaited[hashed[i]] <= 0:
                    del self._awaited[hashed[i]]
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
                *, background: bool) -> Piece:
        for h, future in zip(hashed, done, strict=True):
            self._inflight[h] = future
        piece = Piece(texts, hashed, done, self._batcher.submit(texts, background=background))
        piece.job.future.add_done_callback(functools.partial(self._piece_done, piece))
        return piece

    def _piece_done(self, piece: Piece, future: asyncio.Future[np.ndarray]) -> None:
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

    def _abandon(self, pieces: list[Piece]) -> tuple[int, int]:
        """The caller is gone (or out of time): pieces the worker has not started go to the
        background queue, except the texts another caller awaits, which go back to the worker
        as a caller's piece; the running piece finishes and is stored. Returns (texts queued,
        texts dropped because the queue was full)."""
        queued = dropped = 0
        for piece in pieces:
            if not self._batcher.withdraw(piece.job):
                continue  # running or done: _piece_done stores it
            awaited = [k for k, h in enumerate(piece.hashed) if self._awaited[h] > 0]
            if awaited:  # keeps their in-flight entries: the waiters are told as before
                self._submit([piece.texts[k] for k in awaited], [piece.hashed[k] for k in awaited],
                             [piece.done[k] for k in awaited], background=False)
            for text, h, done in zip(piece.texts, piece.hashed, piece.done, strict=True):
                if self._awaited[h] > 0:
                    continue
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
        self, missing: list[int], pieces: list[Piece],
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
        if not self._queue.add(h, text, done):
            return False
        self._start_prefetch_loop()
        return True

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

    async def _prefetch_loop(self) -> None:
        assert self._queue_ready is not None
        while True:
            await self._queue_ready.wait()
            if not self._queue:
                self._queue.clear()  # only heap entries callers took out are left
                self._queue_ready.clear()
                continue
            chunk = self._queue.take_chunk()
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

    async def _embed_chunk(self, chunk: dict[str, QueuedText]) -> None:
        """Shared cache first, then the backend (at background priority unless a caller waits
        for one of the texts); results to the LRU."""
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
            awaited = any(self._awaited[h] > 0 for h in hashed)  # a caller waits for some
            piece = self._submit([chunk[h].text for h in hashed], hashed,
                                 [chunk[h].done for h in hashed], background=not awaited)
            self._chunk_piece = piece
            try:
                await piece.job.future
            finally:
                self._chunk_piece = None

    async def close(self) -> None:
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            try:
                await self._prefetch_task
            except asyncio.CancelledError:
                pass
            self._prefetch_task = None
        for entry in self._queue.clear():
            if not entry.done.done():
                entry.done.set_result(False)
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
