"""Readiness and admission control, shared by the gRPC and REST front doors.

One counter of ``max_concurrency`` slots covers every computing request of the process. A unary
call (gRPC ``ComputeAdvantages``, REST ``POST /v1/advantages``) that finds no free slot is refused
at once (RESOURCE_EXHAUSTED / 429): a fast refusal lets the client back off instead of queueing
behind work it may abandon. A stream request waits for a slot instead (backpressure): the stream
is slowed, never refused.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Gauge
from proxmo.errors import NotReady, Overloaded


class Phase(enum.Enum):
    STARTING = "starting"   # loading and warming up: not ready
    SERVING = "serving"     # ready
    DRAINING = "draining"   # SIGTERM received: finishing in-flight work, refusing new work


class Lifecycle:
    """The process phase, read by health checks and by every computing request."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    def check_ready(self) -> None:
        """Raise NotReady (UNAVAILABLE / 503) unless serving."""
        if self.phase is Phase.STARTING:
            raise NotReady("server is warming up, retry shortly")
        if self.phase is Phase.DRAINING:
            raise NotReady("server is shutting down")


class Admission:
    """``max_concurrency`` slots; ``inflight`` mirrors the slots in use."""

    def __init__(self, max_concurrency: int, inflight: Gauge) -> None:
        self.limit = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self._inflight = inflight

    @asynccontextmanager
    async def unary_slot(self) -> AsyncIterator[None]:
        """A slot now, or Overloaded (RESOURCE_EXHAUSTED / 429) at once."""
        # locked() is also true while streams wait, so waiting streams keep their turn.
        if self._slots.locked():
            raise Overloaded(f"server is at its concurrency limit ({self.limit})")
        await self._slots.acquire()  # free slot: returns without suspending
        async with self._held():
            yield

    @asynccontextmanager
    async def waiting_slot(self) -> AsyncIterator[None]:
        """A slot, waiting as long as it takes (streams)."""
        await self._slots.acquire()
        async with self._held():
            yield

    @asynccontextmanager
    async def _held(self) -> AsyncIterator[None]:
        self._inflight.inc()
        try:
            yield
        finally:
            self._inflight.dec()
            self._slots.release()
