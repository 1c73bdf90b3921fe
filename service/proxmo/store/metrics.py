"""Prometheus metrics of the success-rate store; every method is a no-op without a registry.

Names follow the Prometheus guide (base units, ``_total`` counters):
  proxmo_store_duration_seconds{op}   histogram of store calls (apply, get, scan, reset, flush)
  proxmo_store_fallbacks_total        applies answered degraded (the engine used BATCH)
  proxmo_store_replays_total          applies whose request_id had already been applied
  proxmo_store_buffered_updates       updates waiting to be written (gauge)
  proxmo_store_buffer_dropped_total   buffered updates dropped because the buffer was full
  proxmo_store_flushed_total          buffered updates written after the store came back
  proxmo_store_up                     1 when the store answers, 0 when degraded
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Loopback Redis answers in ~0.1-1 ms; a dead one costs the client timeout (0.25 s default).
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class StoreMetrics:
    """The store's metrics (one store per process, so no store label)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._enabled = registry is not None
        if registry is None:
            return
        self._duration = Histogram(
            "proxmo_store_duration_seconds",
            "Duration of success-rate store calls.",
            ["op"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self._fallbacks = Counter(
            "proxmo_store_fallbacks",
            "Applies answered degraded (p fell back to BATCH).",
            registry=registry,
        )
        self._replays = Counter(
            "proxmo_store_replays",
            "Applies whose request_id had already been applied.",
            registry=registry,
        )
        self._buffered = Gauge(
            "proxmo_store_buffered_updates",
            "Updates waiting to be written to the store.",
            registry=registry,
        )
        self._dropped = Counter(
            "proxmo_store_buffer_dropped",
            "Buffered updates dropped because the buffer was full.",
            registry=registry,
        )
        self._flushed = Counter(
            "proxmo_store_flushed",
            "Buffered updates written after the store came back.",
            registry=registry,
        )
        self._up = Gauge(
            "proxmo_store_up",
            "1 when the success-rate store answers, 0 when degraded.",
            registry=registry,
        )
        self._up.set(1)
        self._buffered.set(0)

    @contextmanager
    def timed(self, op: str) -> Iterator[None]:
        """Observes the duration of the block under ``op`` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._enabled:
                self._duration.labels(op).observe(time.perf_counter() - start)

    def fallback(self) -> None:
        if self._enabled:
            self._fallbacks.inc()

    def replay(self) -> None:
        if self._enabled:
            self._replays.inc()

    def buffered(self, count: int) -> None:
        if self._enabled:
            self._buffered.set(count)

    def dropped(self, count: int = 1) -> None:
        if self._enabled:
            self._dropped.inc(count)

    def flushed(self, count: int) -> None:
        if self._enabled:
            self._flushed.inc(count)

    def up(self, is_up: bool) -> None:
        if self._enabled:
            self._up.set(1 if is_up else 0)
