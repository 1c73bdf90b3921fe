"""Bounds on REST connections that uvicorn does not set itself.

uvicorn caps neither the number of open connections (each holds a file descriptor: enough
half-open ones exhaust the process's descriptors and both doors stop answering) nor the time a
client may take to send a request's headers (a client trickling bytes keeps its connection
forever; uvicorn's keep-alive timeout only runs between requests). ``bounded_h11`` is uvicorn's
h11 protocol with both:

- a connection beyond ``max_connections`` is closed as soon as it is accepted (nothing is read
  from it); one warning a second at most says so;
- a connection that has not sent a complete request head within ``header_timeout_s`` of
  connecting, or of its previous answer, is closed.

Header size is bounded by h11 (``MAX_HEADER_BYTES``: larger heads get 400).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("proxmo.server.http")

# Largest request head (request line and headers), bytes.
MAX_HEADER_BYTES = 16 * 1024


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with a connection cap and a request-head timeout (set by ``bounded_h11``)."""

    max_connections = 256
    header_timeout_s = 10.0
    _last_warning = 0.0  # class-wide: one warning a second, whatever the number of refusals

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - BoundedH11Protocol._last_warning >= 1.0:
                BoundedH11Protocol._last_warning = now
                log.warning("REST connection refused: %d open connections (the limit)",
                            self.max_connections)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a complete request head arrived
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bounded_h11(max_connections: int, header_timeout_s: float) -> type[BoundedH11Protocol]:
    """The protocol class to hand to ``uvicorn.Config(http=...)``."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {
        "max_connections": max_connections, "header_timeout_s": header_timeout_s,
    })
