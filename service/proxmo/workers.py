"""Compute worker processes: a process pool that survives the death of a worker.

The Engine's CPU-bound stages (conversion, validation, TF-IDF, the estimator) hold the GIL, so
threads cannot spread them over cores; worker processes can. This module knows nothing about
what it runs: it starts N processes, warms each one, runs picklable functions on them, and turns
a dead worker into one retryable error instead of a wedged server.

Why ``forkserver``: gRPC starts threads in the server process, and forking a threaded process
can deadlock the child. The fork server is a fresh single-threaded interpreter that imports
``preload`` once and forks every worker from there, so a worker (or its replacement after a
crash) starts in milliseconds without ever forking the gRPC process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from proxmo.errors import ProxmoError

T = TypeVar("T")

log = logging.getLogger("proxmo.workers")


class WorkerLost(ProxmoError):
    """A compute worker died under this request (killed, e.g. out of memory); the pool was
    restarted. Retryable: the same request usually succeeds on the new pool."""

    grpc_code = "UNAVAILABLE"
    http_status = 503

    def __init__(self, message: str) -> None:
        super().__init__("", message)


def _start_worker(initializer: Callable[[], None]) -> None:
    # Ctrl-C reaches the whole process group, workers included; the server process decides
    # when they stop (the executor's shutdown), so that a drain lets admitted work finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    initializer()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class ComputePool:
    """``workers`` processes, each running ``initializer`` once at start (import + warm-up).

    ``run`` is the only way work gets in. When a worker dies, every call then on this pool
    fails with ``WorkerLost`` (the executor cannot tell which call killed it), the pool is
    replaced at once and its new workers are started in the background; later calls run
    normally.
    """

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[[], None],
        preload: Sequence[str] = (),
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._initializer = initializer
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))
        self._executor = self._new_executor()
        self.restarts = 0

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=functools.partial(_start_worker, self._initializer),
        )

    def _prestart(self, executor: ProcessPoolExecutor) -> list[Future[int]]:
        """Start every worker now. Processes start on demand, one per submit that finds no
        idle worker, so N submits made together start N processes."""
        return [executor.submit(os.getpid) for _ in range(self.workers)]

    async def start(self) -> list[int]:
        """Start and warm every worker (each runs the initializer); returns their pids."""
        # Starting a process waits for the fork server, which imports `preload` first (a
        # second or more): off the event loop, which keeps answering health checks meanwhile.
        futures = await asyncio.to_thread(self._prestart, self._executor)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def pids(self) -> list[int]:
        """Pids of the running workers (tests kill one to check that the pool survives)."""
        return list(self._executor._processes)  # no public accessor in concurrent.futures

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker. Exceptions raised by ``fn`` come back as they were
        raised (they must pickle: ``ProxmoError`` does); a worker dying under the call raises
        WorkerLost. A pool found broken before the call got in (a worker died meanwhile) is
        replaced and the call runs on the new one: it cannot have caused the death."""
        for _ in range(2):
            executor = self._executor
            try:
                future = executor.submit(fn, *args)
            except BrokenProcessPool:
                self._replace(executor)
                continue
            try:
                return await asyncio.wrap_future(future)
            except BrokenProcessPool:
                self._replace(executor)
                break
        raise WorkerLost(
            "a compute worker process died while this request was queued or running (killed, "
            "e.g. out of memory); the workers were restarted, retry"
        )

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        # Every call that was on the broken pool lands here; only the first replaces it.
        if self._executor is not broken:
            return
        self.restarts += 1
        log.error("a compute worker died: restarting the pool of %d workers", self.workers,
                  extra={"restarts": self.restarts})
        self._executor = self._new_executor()
        self._prestart(self._executor)  # warm in the background; nobody waits for it
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (waits for the calls they are running)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
