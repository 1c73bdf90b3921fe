"""Eager PyTorch backends: CPU float32 (the default without CUDA), CPU bfloat16 (opt-in, only
with bf16 instructions), CUDA float16 (or float32/bfloat16 when asked)."""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from .base import BackendUnavailable, EncoderBackend, gpu_warmup_shapes
from .model import LoadedModel, SentencePipeline

log = logging.getLogger("proxmo.encoder")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_PAD_MULTIPLE = 16
CPU_MAX_BATCH = 64  # sequence buckets on GPU: fewer distinct shapes to warm up and tune


def available_cores() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_cpu_threads(requested: int) -> int:
    """torch intra-op threads. 0 = auto: every available core up to 2, one core fewer above.

    Why: MiniLM on 2 cores runs ~1.8x faster with 2 threads than 1, and while it runs the event
    loop only waits for it. With more cores one is left for gRPC, the event loop, tokenization
    and the estimators, so OpenMP threads never wait for a descheduled sibling (two threads on a
    core shared with another busy process collapse to below one thread's speed). Capped at 8:
    batches of short texts do not scale further.
    """
    if requested > 0:
        return requested
    cores = available_cores()
    return cores if cores <= 2 else min(8, cores - 1)


def cpu_has_bf16() -> bool:
    """bf16 on CPU is only fast with native instructions; without them it is ~100x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_device_label() -> str:
    return f"cuda:0 ({torch.cuda.get_device_name(0)})"


class TorchBackend(EncoderBackend):
    """The model's own modules (transformer, pooling, normalize) run eagerly by PyTorch.

    ``TorchBackend(model, device="cpu"|"cuda", dtype=...)`` raises BackendUnavailable when the
    combination cannot run here; a dtype other than float32 must then pass the parity gate
    (the chain runs it, see chain.py).
    """

    def __init__(self, model: LoadedModel, *, device: str, dtype: str) -> None:
        super().__init__(model)
        if device == "cpu":
            self.name = "torch-cpu"
            if dtype == "float16":
                raise BackendUnavailable(
                    self.name, "unsupported_dtype",
                    "float16 on CPU is not supported (no fast fp16 kernels; use bfloat16)",
                )
            if dtype == "bfloat16" and not cpu_has_bf16():
                raise BackendUnavailable(
                    self.name, "cpu_lacks_bf16",
                    "bfloat16 needs avx512_bf16 or amx_bf16, which this CPU does not have",
                )
            self._device = torch.device("cpu")
            self.device = "cpu"
            # Length-sorted runs of 64 keep padding low on CPU, where every padded token costs
            # compute (sentence-transformers' own default is 32).
            self.max_batch_size = CPU_MAX_BATCH
        elif device == "cuda":
            self.name = "torch-cuda"
            if not torch.cuda.is_available():
                raise BackendUnavailable(self.name, "no_cuda", "CUDA is not available")
            self._device = torch.device("cuda", 0)
            self.device = cuda_device_label()
            self.pad_multiple = GPU_PAD_MULTIPLE
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.dtype = dtype
        transformer = model.transformer
        if device != "cpu" or dtype != "float32":
            # A converted copy: the fp32 CPU module stays intact as the parity reference and the
            # last fallback.
            transformer = copy.deepcopy(transformer).to(self._device, _TORCH_DTYPES[dtype])
        self._pipeline = SentencePipeline(transformer, model.pooling_mode).eval()

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self._device, non_blocking=True)
            mask = torch.from_numpy(attention_mask).to(self._device, non_blocking=True)
            return np.asarray(self._pipeline(ids, mask).cpu().numpy(), dtype=np.float32)

    def warmup_shapes(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        if self._device.type != "cuda":
            return super().warmup_shapes(max_batch_tokens)
        return gpu_warmup_shapes(
            max_seq_length=self.max_seq_length,
            pad_multiple=self.pad_multiple,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=max_batch_tokens,
        )

    def close(self) -> None:
        del self._pipeline
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
