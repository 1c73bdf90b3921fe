"""Scheduling the encoder's work: the batcher, the pieces a call is cut into, and the background
queue.

- ``Batcher``: callers' texts go to ONE worker thread that runs the backend (length-sorted
  micro-batches, see base.py); callers arriving within ``max_wait_s`` of each other (or while
  the worker is busy) are encoded together, and background jobs run only while no caller waits.
- ``token_pieces``: a call's missing texts, shortest first, in pieces of about
  ``max_batch_tokens``, each stored as soon as it is encoded.
- ``BackgroundQueue``: texts waiting for background embedding (prefetch, and what callers left
  unfinished), bounded in texts and bytes, taken in small chunks of similar length (shortest
  first), so a caller waits at most one chunk for background work.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .base import EncoderBackend
from .metrics import EncoderMetrics

log = logging.getLogger("proxmo.encoder")

MAX_WAIT_S = 0.002  # how long a lone caller waits for company
# Background (prefetch) chunks: small, so that a caller arriving meanwhile waits little
# (~0.4 s of MiniLM on 2 CPU cores; milliseconds on a GPU).
PREFETCH_CHUNK_TOKENS = 2048
# What one queued text is charged beyond the string itself (its dict, heap and future entries),
# for the prefetch queue's byte cap.
QUEUE_ENTRY_OVERHEAD_BYTES = 400
RATE_MIN_TEXTS = 8  # runs smaller than this do not update the measured throughput
RATE_SMOOTHING = 0.2  # weight of the newest run in the throughput's moving average


@dataclass(eq=False)
class Job:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    est_tokens: int
    background: bool = False


def estimated_tokens(text: str) -> int:
    """A rough token count for gathering work (~4 characters a token, plus [CLS]/[SEP]);
    micro-batches use real counts."""
    return len(text) // 4 + 2


class Batcher:
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
        self._pending: list[Job] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Measured throughput, distinct texts a second: a moving average over the worker's
        # runs (0.0 until one ran). Published in GetServerInfo so clients can size deadlines.
        self.texts_per_second = 0.0

    def submit(self, texts: list[str], *, background: bool = False) -> Job:
        """Queue texts for the worker; the job's future gets float32 [len(texts), d].
        ``background`` work runs only while no other caller waits."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="proxmo-encoder-batcher")
        assert self._wakeup is not None
        est = sum(estimated_tokens(t) for t in texts)
        job = Job(texts, loop.create_future(), est, background)
        self._pending.append(job)
        self._wakeup.set()
        return job

    async def encode(self, texts: list[str], *, background: bool = False) -> np.ndarray:
        return await self.submit(texts, background=background).future

    def withdraw(self, job: Job) -> bool:
        """Take a job back before the worker starts it: True; False once it runs (or ran)."""
        for k, pending in enumerate(self._pending):
            if pending is job:
                del self._pending[k]
                return True
        return False

    def promote(self, job: Job) -> None:
        """A caller now waits for this background job: it runs as a caller's job, in its place
        in arrival order (no effect once it runs)."""
        job.background = False

    def _observe_rate(self, texts: int, seconds: float) -> None:
        if texts < RATE_MIN_TEXTS or seconds <= 0.0:
            return  # a handful of texts says more about overheads than about throughput
        rate = texts / seconds
        previous = self.texts_per_second
        self.texts_per_second = rate if previous == 0.0 else (
            (1.0 - RATE_SMOOTHING) * previous + RATE_SMOOTHING * rate)

    def _take_jobs(self) -> list[Job]:
        """Callers' jobs first, in arrival order, up to the token budget; a background job
        only when no caller waits (it runs alone)."""
        callers = [j for j in self._pending if not j.background]
        if not callers:
            return [self._pending.pop(0)] if self._pending else []
        jobs: list[Job] = []
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
            except asyncio.CancelledError:  # closed while the worker runs them
                _fail_closed(jobs)
                raise
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
        _fail_closed(self._pending)
        self._pending.clear()
        # Wait for a batch still running on the worker before the backend is released.
        await asyncio.to_thread(self._executor.shutdown, True)


def _fail_closed(jobs: list[Job]) -> None:
    """Tells the callers of jobs that will never be encoded that the encoder is closed."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(RuntimeError("the encoder is closed"))


@dataclass
class QueuedText:
    """A text waiting for background embedding; ``done`` is True once it is in the LRU
    (False: its chunk failed)."""

    text: str
    done: asyncio.Future[bool]
    size: int  # what it is charged against the queue's byte cap


@dataclass(eq=False)
class Piece:
    """Texts sent to the worker as one job. Each text's ``done`` future is its in-flight entry:
    True once its vector is in the LRU, False if the job failed."""

    texts: list[str]
    hashed: list[str]
    done: list[asyncio.Future[bool]]
    job: Job
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


class BackgroundQueue:
    """Texts waiting for background embedding (prefetch and what callers left unfinished),
    keyed by text hash; touched only from the event loop.

    At most ``capacity`` texts wait (the LRU's size: more would evict each other before any
    batch used them) and at most ``max_bytes`` of them (texts may be long). Chunks are taken
    shortest first (a heap of (length, seq, hash); entries a caller has taken out are skipped
    when popped), so each chunk holds texts of similar length: taking them in arrival order
    pads short texts to long ones, measured 2x slower."""

    def __init__(self, *, capacity: int, max_bytes: int, chunk_tokens: int) -> None:
        self._entries: dict[str, QueuedText] = {}
        self.bytes = 0  # charged to the texts waiting (queue_charge)
        self._by_length: list[tuple[int, int, str]] = []
        self._sequence = itertools.count()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._chunk_tokens = chunk_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, h: str) -> QueuedText | None:
        return self._entries.get(h)

    def add(self, h: str, text: str, done: asyncio.Future[bool]) -> bool:
        """Queue one text; False when the queue is full."""
        size = queue_charge(text)
        if len(self._entries) >= self._capacity or self.bytes + size > self._max_bytes:
            return False
        self._entries[h] = QueuedText(text, done, size)
        self.bytes += size
        heapq.heappush(self._by_length, (len(text), next(self._sequence), h))
        return True

    def take(self, h: str) -> QueuedText | None:
        """Take one text out (a caller encodes it now); None if it is not queued."""
        entry = self._entries.pop(h, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def take_chunk(self) -> dict[str, QueuedText]:
        """The shortest queued texts, up to ``chunk_tokens`` (at least one)."""
        if len(self._by_length) > 2 * len(self._entries) + 1024:  # mostly entries taken out
            self._by_length = [item for item in self._by_length if item[2] in self._entries]
            heapq.heapify(self._by_length)
        chunk: dict[str, QueuedText] = {}
        tokens = 0
        while self._by_length:
            h = self._by_length[0][2]
            entry = self._entries.get(h)
            if entry is None:  # taken out by a caller meanwhile
                heapq.heappop(self._by_length)
                continue
            cost = estimated_tokens(entry.text)
            if chunk and tokens + cost > self._chunk_tokens:
                break
            heapq.heappop(self._by_length)
            self.take(h)
            chunk[h] = entry
            tokens += cost
        return chunk

    def clear(self) -> list[QueuedText]:
        """Empty the queue (the heap too); returns the entries that were waiting."""
        entries = list(self._entries.values())
        self._entries.clear()
        self.bytes = 0
        self._by_length.clear()
        return entries
