"""Success-rate store: per-task decayed success history for the HISTORY source.

``create_store`` is the one way the server builds a store: an empty URL gives the embedded
``MemoryStore``, a ``redis://`` / ``rediss://`` / ``unix://`` URL a ``RedisStore``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxmo.store.base import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_REQUEST_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    ApplyResult,
    StoreHealth,
    SuccessRateStore,
    TaskRecord,
    TaskUpdate,
)
from proxmo.store.memory import MemoryStore
from proxmo.store.redis import RedisStore, StoreUnavailable

__all__ = [
    "ApplyResult",
    "MemoryStore",
    "RedisStore",
    "StoreHealth",
    "StoreUnavailable",
    "SuccessRateStore",
    "TaskRecord",
    "TaskUpdate",
    "create_store",
]


def create_store(
    redis_url: str,
    *,
    namespace: str = "proxmo",
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    request_ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    timeout_s: float = 0.25,
    default_prior: float = 0.0,
    registry: CollectorRegistry | None = None,
) -> SuccessRateStore:
    """The store for ``redis_url`` (empty: in memory). Connects lazily: never raises for an
    unreachable Redis (the store starts degraded and recovers by itself).

    ``default_prior`` is the prior a = b of ``TaskRecord.success_rate`` (reads have no request
    config); ``apply`` takes each request's own prior.
    """
    if not redis_url:
        return MemoryStore(
            namespace=namespace,
            ttl_seconds=ttl_seconds,
            request_ttl_seconds=request_ttl_seconds,
            default_prior=default_prior,
            registry=registry,
        )
    return RedisStore(
        redis_url,
        namespace=namespace,
        ttl_seconds=ttl_seconds,
        request_ttl_seconds=request_ttl_seconds,
        max_buffered=max_buffered,
        timeout_s=timeout_s,
        default_prior=default_prior,
        registry=registry,
    )
