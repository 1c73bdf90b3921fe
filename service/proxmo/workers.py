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
import collections
import functools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from proxmo.errors import DeadlineExceeded, ProxmoError

T = TypeVar("T")

log = logging.getLogger("proxmo.workers")


class WorkerLost(ProxmoError):
    """A compute worker died under this request (killed, e.g. out of memory); the pool was
    restarted. Retryable: the same request usually succeeds on the new pool."""

    grpc_code = "UNAVAILABLE"
    http_status = 503

    def __init__(self, message: str) -> None:
        super().__init__("", message)


# This worker's "call finished" flag (see ComputePool._stop_or_keep), set by _start_worker.
_finished: Any = None


def _start_worker(initializer: Callable[[], None], server_pid: int,
                  finished: tuple[Any, Any]) -> None:
    # Ctrl-C and a SIGTERM to the whole process group (systemd, honcho, tini -g) reach the
    # workers too; the server process decides when they stop (the executor's shutdown), so
    # that a drain lets admitted work finish. Whichever way the server ends, they end with it.
    global _finished
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _finished = finished
    exit_with(server_pid)
    initializer()


def _run_call(fn: Callable[..., T], *args: Any) -> T:
    """Runs in the worker: ``fn(*args)``, then marks the call finished (under the flag's lock)
    before its result is written back, so the server never kills a worker mid-write."""
    flag, lock = _finished
    try:
        return fn(*args)
    finally:
        with lock:
            flag.value = 1


def exit_with(pid: int) -> None:
    """End this process (``os._exit``) as soon as process ``pid`` ends, however it ends
    (SIGKILL included); at once if it is already gone.

    A worker's parent is the fork server, not the server, and the fork server stays alive as
    long as any worker holds its "alive" pipe, so neither PR_SET_PDEATHSIG nor the fork
    server's own exit notices the server's death. A daemon thread waits on a pidfd of the
    server (Linux >= 5.3: woken the moment it exits, immune to pid reuse); without pidfds it
    polls ``os.kill(pid, 0)`` once a second.
    """
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd_open (old kernel, other OS)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while _alive(pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="proxmo-exit-with-server", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class ComputePool:
    """``workers`` processes, each running ``initializer`` once at start (import + warm-up).

    ``run`` is the only way work gets in. Each worker is a one-process executor, so the pool
    knows which process runs which call: a call whose caller gives up (its deadline passes, or
    its task is cancelled because the client left) has its worker killed and replaced, so that
    abandoned work never holds a core the next request needs. A worker that dies on its own
    fails only the call it was running (WorkerLost) and is replaced the same way. A replaced
    worker's successor takes calls as soon as it is warm; the other workers serve meanwhile.
    """

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[[], None],
        preload: Sequence[str] = (),
        on_replace: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_replace(stopped)`` is told of every replaced worker (metrics): ``stopped``
        True when its caller gave up, False when it died."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._initializer = initializer
        self._context = multiprocessing.get_context("forkserver")
        # worker_preload first: the fork server ignores SIGTERM (see that module)
        self._context.set_forkserver_preload(["proxmo.worker_preload", *preload])
        # each executor's worker's "call finished" flag and its lock
        self._finished: dict[ProcessPoolExecutor, tuple[Any, Any]] = {}
        self._executors = [self._new_executor() for _ in range(workers)]
        # Free workers (by index), and the callers waiting for one, first come first served.
        self._idle = list(range(workers))
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()
        self._warming: dict[int, Future[int]] = {}  # successors' start-up, by worker index
        self.restarts = 0  # workers replaced (died, or stopped under an abandoned call)
        self.stopped = 0  # of which stopped because their caller gave up
        self._on_replace = on_replace

    def _new_executor(self) -> ProcessPoolExecutor:
        finished = (self._context.RawValue("b", 0), self._context.Lock())
        executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=functools.partial(_start_worker, self._initializer, os.getpid(),
                                          finished),
        )
        self._finished[executor] = finished
        return executor

    async def start(self) -> list[int]:
        """Start and warm every worker (each runs the initializer); returns their pids."""
        # Starting a process waits for the fork server, which imports `preload` first (a
        # second or more): off the event loop, which keeps answering health checks meanwhile.
        futures = await asyncio.to_thread(
            lambda: [executor.submit(os.getpid) for executor in self._executors])
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def pids(self) -> list[int]:
        """Pids of the running workers (tests kill one to check that the pool survives)."""
        # no public accessor in concurrent.futures
        return [pid for executor in self._executors for pid in executor._processes]

    def idle_workers(self) -> int:
        """Workers with no call (a call is on its worker as soon as this count drops)."""
        return len(self._idle)

    async def _acquire(self) -> int:
        if self._idle and not self._waiters:
            # A warm worker first; one whose successor still starts only when none is.
            warm = [i for i in self._idle if i not in self._warming or self._warming[i].done()]
            index = warm[-1] if warm else self._idle[-1]
            self._idle.remove(index)
            return index
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a worker as we were cancelled
                self._release(waiter.result())
            elif waiter in self._waiters:  # _release drops cancelled waiters itself
                self._waiters.remove(waiter)
            raise

    def _release(self, index: int) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(index)
                return
        self._idle.append(index)

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """``fn(*args)`` on a free worker. Exceptions raised by ``fn`` come back as they were
        raised (they must pickle: ``ProxmoError`` does); a worker dying under the call raises
        WorkerLost. ``deadline`` (``time.monotonic()``): past it, the call's worker is stopped
        and DeadlineExceeded raised; a cancelled call stops its worker the same way."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(remaining) as scope:
                index = await self._acquire()
                future = self._submit(index, fn, *args)
                try:
                    result = await asyncio.wrap_future(future)
                except BrokenProcessPool:
                    self._replace(index, stopped=False)
                    raise WorkerLost(
                        "a compute worker process died while running this request (killed, "
                        "e.g. out of memory); it was restarted, retry"
                    ) from None
                except BaseException:
                    # Cancelled (the client left) or timed out (the deadline): the work is
                    # abandoned, so its process is stopped instead of running on for nobody.
                    self._stop_or_keep(index, future)
                    raise
                self._release(index)
                return result
        except TimeoutError:
            if not scope.expired():
                raise
            raise DeadlineExceeded(
                "deadline exceeded while computing; the work was stopped") from None

    def _submit(self, index: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Submit to worker ``index``; a worker found dead before the call got in (it died
        while idle) is replaced and the call goes to its successor."""
        try:
            return self._submit_to(self._executors[index], fn, *args)
        except BrokenProcessPool:
            self._replace(index, stopped=False, release=False)
            return self._submit_to(self._executors[index], fn, *args)

    def _submit_to(self, executor: ProcessPoolExecutor, fn: Callable[..., T],
                   *args: Any) -> Future[T]:
        flag, _ = self._finished[executor]
        flag.value = 0  # the worker is idle: nothing of it to race with
        return executor.submit(_run_call, fn, *args)

    def _stop_or_keep(self, index: int, future: Future[Any]) -> None:
        """The caller of the call on worker ``index`` gave up: kill and replace the worker
        while it still computes; keep it when the call already finished (its result is being
        written back: a worker killed mid-write leaves a partial message that wedges the
        executor's reader thread, and with it the server's exit)."""
        flag, lock = self._finished[self._executors[index]]
        # Held while deciding and killing: the worker cannot mark itself finished meanwhile.
        # Not got within a second: the worker died holding it, so there is nothing to keep.
        locked = lock.acquire(timeout=1.0)
        try:
            if not locked or not (future.done() or flag.value):
                self._replace(index, stopped=True)
                return
        finally:
            if locked:
                lock.release()
        self._release(index)

    def _replace(self, index: int, *, stopped: bool, release: bool = True) -> None:
        """Kill worker ``index`` (if still alive) and start its successor; ``release``: the
        successor is free for the next call (which waits for its warm-up only if no other
        worker is free)."""
        old = self._executors[index]
        self.restarts += 1
        self.stopped += stopped
        if self._on_replace is not None:
            self._on_replace(stopped)
        for process in list(old._processes.values()):
            if process.is_alive():
                process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        self._finished.pop(old, None)
        if stopped:
            log.warning("stopped a compute worker whose caller gave up (deadline or client "
                        "left); starting its successor", extra={"restarts": self.restarts})
        else:
            log.error("a compute worker died: starting its successor",
                      extra={"restarts": self.restarts})
        new = self._executors[index] = self._new_executor()
        if not release:
            return
        started = time.monotonic()
        warming = self._warming[index] = new.submit(os.getpid)  # starts it and its warm-up
        warming.add_done_callback(lambda _: log.info(
            "compute worker successor warm", extra={"ms": round(
                (time.monotonic() - started) * 1000, 1)}))
        self._release(index)

    def close(self) -> None:
        """Stop the workers (waits for the calls they are running)."""
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)
