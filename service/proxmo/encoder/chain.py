"""Choosing the backend at start-up: try the preferred one, fall down the chain on any failure.

    auto (CUDA)     tensorrt fp16 -> torch-cuda fp16 -> torch-cpu fp32
    auto (no CUDA)  torch-cpu fp32 (bfloat16 only when asked: dtype="bfloat16")
    tensorrt        tensorrt -> torch-cuda -> torch-cpu
    torch-cuda      torch-cuda -> torch-cpu
    torch-cpu       torch-cpu

A candidate is accepted once it is built, passes the parity gate when its precision is not
float32 or it is compiled (cosine >= 0.999 per row against fp32 on padded probe batches), and
has run every warm-up shape. torch-cpu float32 always ends the chain; if even that fails the
model itself is unusable and ``EncoderUnavailable`` is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .base import BackendUnavailable, EncoderBackend, check_parity, reference_embeddings
from .model import LoadedModel, load_model
from .settings import EncoderSettings
from .torch_backend import TorchBackend, choose_cpu_threads

log = logging.getLogger("proxmo.encoder")


class EncoderUnavailable(RuntimeError):
    """No backend at all could run the model."""


@dataclass(frozen=True)
class Candidate:
    backend: str  # "tensorrt" | "torch-cuda" | "torch-cpu"
    dtype: str


def candidate_chain(settings: EncoderSettings, *, cuda: bool) -> list[Candidate]:
    """The ordered (backend, dtype) candidates for these settings; the last is torch-cpu fp32."""
    backend = settings.backend
    if backend == "auto":
        backend = "tensorrt" if cuda else "torch-cpu"
    order = {"tensorrt": ["tensorrt", "torch-cuda", "torch-cpu"],
             "torch-cuda": ["torch-cuda", "torch-cpu"],
             "torch-cpu": ["torch-cpu"]}[backend]
    chain: list[Candidate] = []
    for name in order:
        if settings.dtype != "auto":
            dtype = settings.dtype
        else:
            dtype = "float32" if name == "torch-cpu" else "float16"
        chain.append(Candidate(name, dtype))
    last_resort = Candidate("torch-cpu", "float32")
    if chain[-1] != last_resort:
        chain.append(last_resort)
    return chain


def _build(candidate: Candidate, model: LoadedModel, settings: EncoderSettings) -> EncoderBackend:
    if candidate.backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackend  # lazy: never touches torch_tensorrt on CPU

        return TensorRTBackend(
            model, dtype=candidate.dtype, engine_cache_root=settings.engine_cache_dir
        )
    device = "cuda" if candidate.backend == "torch-cuda" else "cpu"
    return TorchBackend(model, device=device, dtype=candidate.dtype)


def _needs_parity_gate(backend: EncoderBackend) -> bool:
    return backend.name == "tensorrt" or backend.dtype != "float32"


def select_backend(
    settings: EncoderSettings,
    *,
    model: LoadedModel | None = None,
    build: Callable[[Candidate, LoadedModel, EncoderSettings], EncoderBackend] = _build,
) -> tuple[EncoderBackend, list[BackendUnavailable]]:
    """The first candidate that builds, passes its gate and warms up; plus every failure."""
    threads = choose_cpu_threads(settings.threads)
    torch.set_num_threads(threads)
    log.info("encoder: torch intra-op threads = %d (setting %d)", threads, settings.threads)
    if model is None:
        model = load_model(settings.model_path)
    chain = candidate_chain(settings, cuda=torch.cuda.is_available())
    failures: list[BackendUnavailable] = []
    reference: np.ndarray | None = None
    for candidate in chain:
        backend: EncoderBackend | None = None
        try:
            backend = build(candidate, model, settings)
            if _needs_parity_gate(backend):
                if reference is None:
                    reference = reference_embeddings(model)
                check_parity(backend, reference)
            shapes = backend.warmup(settings.max_batch_tokens)
            log.info(
                "encoder backend %s (%s on %s) ready after %d warm-up shapes",
                backend.name, backend.dtype, backend.device, shapes,
            )
            return backend, failures
        except BackendUnavailable as e:
            failure = e
        except Exception as e:  # noqa: BLE001 - any failure of a candidate means "next one"
            failure = BackendUnavailable(
                candidate.backend, "error", f"{candidate.dtype}: {type(e).__name__}: {e}"
            )
        if backend is not None:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001 - a failed release must not stop the fallback
                log.warning("encoder backend %s: release after failure raised %s: %s",
                            candidate.backend, type(e).__name__, e)
        failures.append(failure)
        log.warning("encoder backend %s (%s) not used: %s", candidate.backend,
                    candidate.dtype, failure)
    raise EncoderUnavailable(
        "no encoder backend could run the model: " + "; ".join(str(f) for f in failures)
    )


def load_backend(settings: EncoderSettings) -> tuple[EncoderBackend, list[str]]:
    """The chosen backend and, in order, why each preferred backend was not used."""
    backend, failures = select_backend(settings)
    return backend, [str(f) for f in failures]
