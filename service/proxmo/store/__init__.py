"""Success-rate store: per-task decayed success history for the HISTORY source.

``create_store`` is the one way the server builds a store: an empty URL (and no sentinels) gives
the embedded ``MemoryStore``; a ``redis://`` / ``rediss://`` / ``unix://`` URL, a Redis Cluster
(``cluster=True``, the URL names any node) or Sentinel addresses a ``RedisStore``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from proxmo.store.base import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_TASKS,
    DEFAULT_REQUEST_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    ApplyResult,
    StoreFull,
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
    "StoreFull",
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
    max_tasks: int = DEFAULT_MAX_TASKS,
    cluster: bool = False,
    sentinels: Sequence[str] = (),
    sentinel_master: str = "",
    wait_replicas: int = 0,
    wait_timeout_s: float = 1.0,
) -> SuccessRateStore:
    """The store for ``redis_url`` (empty: in memory). Connects lazily: never raises for an
    unreachable Redis (the store starts degraded and recovers by itself).

    ``default_prior`` is the prior a = b of ``TaskRecord.success_rate`` (reads have no request
    config); ``apply`` takes each request's own prior.
    """
    if not redis_url and not sentinels:
        return MemoryStore(
            namespace=namespace,
            ttl_seconds=ttl_seconds,
            request_ttl_seconds=request_ttl_seconds,
            default_prior=default_prior,
            registry=registry,
            max_tasks=max_tasks,
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
        max_tasks=max_tasks,
        cluster=cluster,
        sentinels=sentinels,
        sentinel_master=sentinel_master,
        wait_replicas=wait_replicas,
        wait_timeout_s=wait_timeout_s,
    )
