"""The server's Prometheus metrics, on the one registry the whole process shares.

Names follow the Prometheus guide: ``proxmo_`` prefix, base units, ``_total`` on counters. No
task-id labels (unbounded cardinality); per-task rates live in the success-rate store.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Geometric, about x2 per bucket, 1 ms .. 30 s.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
                   20.0, 30.0)


class ServerMetrics:
    """Request-level metrics of both front doors (gRPC and REST). Rows, groups, trajectories
    and success-rate sources are the Engine's metrics, on the same registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "proxmo_requests_total", "Requests handled, by transport, rpc and status code.",
            ["transport", "rpc", "code"], registry=registry,
        )
        self.duration = Histogram(
            "proxmo_request_duration_seconds", "Request latency from receipt to answer.",
            ["transport", "rpc", "code"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inflight = Gauge(
            "proxmo_inflight_requests", "Requests admitted and not yet answered.",
            registry=registry,
        )
        self.rejected = Counter(
            "proxmo_rejected_total",
            "Requests refused before or instead of computing, by reason "
            "(overloaded, invalid, limit, deadline, not_ready, internal).",
            ["reason"], registry=registry,
        )
        self.build = Info("proxmo_build", "Server build.", registry=registry)
        self.default_similarity = Info(
            "proxmo_default_similarity", "Server default similarity.", registry=registry
        )
