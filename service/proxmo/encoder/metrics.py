"""The encoder's Prometheus metrics, shared by the caches, the batcher and the Embedder."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class EncoderMetrics:
    """Encoder metrics, registered on the server's registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache_hits = Counter(
            "proxmo_encoder_cache_hits", "Distinct texts served from a cache.", ["cache"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "proxmo_encoder_cache_misses",
            "Distinct texts of a call found in no cache (sent to the encoder).",
            registry=registry,
        )
        self.cache_errors = Counter(
            "proxmo_encoder_cache_errors",
            "Shared-cache (Redis) operations that failed; the texts were encoded locally.",
            ["op"], registry=registry,
        )
        self.texts_encoded = Counter(
            "proxmo_encoder_texts_encoded",
            "Texts the backend encoded (after deduplication across concurrent callers).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "proxmo_encoder_batch_size", "Texts per backend micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry,
        )
        self.batch_tokens = Histogram(
            "proxmo_encoder_batch_tokens", "Padded tokens (batch x length) per micro-batch.",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=registry,
        )
        self.duration = Histogram(
            "proxmo_encoder_duration_seconds", "Backend time per micro-batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.backend_info = Info(
            "proxmo_encoder_backend", "The active encoder backend.", registry=registry
        )
        self.prefetch_texts = Counter(
            "proxmo_encoder_prefetch_texts",
            "Distinct texts of PrefetchStates calls, by outcome (cached: nothing to do; queued; "
            "dropped: the queue was full; handed_over: left unfinished by a caller that "
            "went away, queued).",
            ["outcome"], registry=registry,
        )
        self.prefetch_queue = Gauge(
            "proxmo_encoder_prefetch_queue",
            "Texts waiting for background embedding (the running chunk included).",
            registry=registry,
        )
        self.prefetch_queue_bytes = Gauge(
            "proxmo_encoder_prefetch_queue_bytes",
            "Bytes charged to the texts waiting for background embedding (capped by "
            "prefetch_queue_bytes).",
            registry=registry,
        )
        self.prefetch_errors = Counter(
            "proxmo_encoder_prefetch_errors",
            "Background chunks that failed (their texts are encoded when a batch needs them).",
            registry=registry,
        )
        self.fallbacks = Counter(
            "proxmo_encoder_fallbacks",
            "Preferred encoder backends that were not used, by reason.",
            ["from_backend", "reason"], registry=registry,
        )

    def observe_batch(self, texts: int, tokens: int, seconds: float) -> None:
        """Called on the worker thread after each micro-batch (prometheus_client is
        thread-safe)."""
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
        self.duration.observe(seconds)
