"""The embedding caches in front of the encoder.

1. the in-process LRU (key: model sha256, blake2b-128 of the text) holds what the backend
   produced, so a hit returns exactly what a fresh encode of the same batch returned;
2. the optional shared Redis cache (``proxmo:emb:<sha[:12]>:<dtype>:<text hash>``, fp16 bytes, TTL)
   lets replicas and restarts reuse work; MGET to read, one pipelined SET EX to write. A value
   read back is fp16-rounded (each component within 2^-11 relative; measured cosine to the
   fresh vector >= 0.99999997, ENCODER advantages within ~1e-5) and is renormalized. fp16 (the
   issue's choice) halves Redis memory; results stay exact wherever the LRU or a fresh encode
   serves them. Redis errors never fail a call: logged, counted, encoded locally, Redis skipped
   for a few seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .metrics import EncoderMetrics

log = logging.getLogger("proxmo.encoder")

REDIS_KEY_PREFIX = "proxmo"
REDIS_BACKOFF_S = 5.0  # after a Redis error, skip it this long instead of paying a timeout per call


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def shared_cache_prefix(model_sha256: str, dtype: str) -> str:
    """Redis key prefix of one model at one compute precision: replicas running float32 and
    bfloat16 must not serve each other's vectors."""
    return f"{REDIS_KEY_PREFIX}:emb:{model_sha256[:12]}:{dtype}:"


def shared_cache_key(model_sha256: str, dtype: str, text: str) -> str:
    """Redis key of one cached embedding."""
    return shared_cache_prefix(model_sha256, dtype) + text_hash(text)


class EmbeddingLRU:
    """An in-process LRU of float32 vectors; touched only from the event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        vector = self._items.get(key)
        if vector is not None:
            self._items.move_to_end(key)
        return vector

    def put(self, key: tuple[str, str], vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = vector
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items


class SharedEmbeddingCache:
    """Redis embedding cache shared by replicas: fp16 little-endian bytes under a TTL."""

    def __init__(
        self, url: str, *, ttl_s: int, model_sha256: str, dtype: str, dimension: int,
        metrics: EncoderMetrics,
    ) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._url = url
        self._ttl_s = ttl_s
        self._prefix = shared_cache_prefix(model_sha256, dtype)
        self._dimension = dimension
        self._metrics = metrics
        self._skip_until = 0.0

    def key(self, hashed_text: str) -> str:
        return self._prefix + hashed_text

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, error: BaseException) -> None:
        self._metrics.cache_errors.labels(op=op).inc()
        self._skip_until = time.monotonic() + REDIS_BACKOFF_S
        log.warning(
            "encoder shared cache %s failed (%s: %s); encoding locally, Redis skipped for %.0f s",
            op, type(error).__name__, error, REDIS_BACKOFF_S,
        )

    def decode(self, raw: bytes | str | None) -> np.ndarray | None:
        """fp16 bytes -> float32 unit vector; anything malformed counts as a miss."""
        if raw is None:
            return None
        if not isinstance(raw, bytes) or len(raw) != 2 * self._dimension:
            self._metrics.cache_errors.labels(op="decode").inc()
            return None
        vector = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0.0:
            self._metrics.cache_errors.labels(op="decode").inc()
            return None
        return vector / norm

    async def get_many(self, hashed: Sequence[str]) -> list[np.ndarray | None]:
        if not hashed or not self._available():
            return [None] * len(hashed)
        try:
            raws = await self._client.mget([self.key(h) for h in hashed])
        except Exception as e:  # noqa: BLE001 - any Redis/network error means "encode locally"
            self._failed("get", e)
            return [None] * len(hashed)
        return [self.decode(raw) for raw in raws]

    async def set_many(self, hashed: Sequence[str], vectors: np.ndarray) -> None:
        if not hashed or not self._available():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for h, vector in zip(hashed, vectors, strict=True):
                pipe.set(self.key(h), vector.astype("<f2").tobytes(), ex=self._ttl_s)
            await pipe.execute()
        except Exception as e:  # noqa: BLE001
            self._failed("set", e)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as e:  # noqa: BLE001 - closing a dead connection is not an error
            log.debug("closing the shared cache client: %s", e)
