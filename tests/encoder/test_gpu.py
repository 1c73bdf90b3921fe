"""GPU backends (``-m gpu``): skipped without CUDA; the TensorRT ones also without
torch_tensorrt. Run on a GPU machine (or the NVIDIA PyTorch image for TensorRT):

    .venv/bin/pytest tests/encoder/test_gpu.py -m gpu -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from proxmo.encoder import EncoderSettings, select_backend
from proxmo.encoder.base import PROBE_TEXTS, check_parity, reference_embeddings
from proxmo.encoder.model import LoadedModel
from proxmo.encoder.torch_backend import TorchBackend

from .alfworld_states import alfworld_groups

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def texts() -> list[str]:
    flat = [s for g in alfworld_groups(4, 4, 30, seed=5) for tr in g for s in tr]
    return list(dict.fromkeys(flat)) + list(PROBE_TEXTS)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_torch_cuda_fp16_parity(model: LoadedModel, st_model: Any) -> None:
    backend = TorchBackend(model, device="cuda", dtype="float16")
    try:
        assert backend.device.startswith("cuda:0 (") and backend.pad_multiple == 16
        assert check_parity(backend, reference_embeddings(model)) >= 0.999
        sample = texts()
        cos = row_cosines(backend.encode(sample), st_model.encode(sample, batch_size=32))
        assert cos.min() >= 0.999
        shapes = backend.warmup(16384)
        assert shapes >= 16  # every 16-token sequence bucket up to 256
    finally:
        backend.close()


def test_chain_without_torch_tensorrt_falls_back_to_torch_cuda(model: LoadedModel) -> None:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - absent (or broken): this is the case under test
        pass
    else:
        pytest.skip("torch_tensorrt is installed here")
    backend, failures = select_backend(EncoderSettings(), model=model)
    try:
        assert (backend.name, backend.dtype) == ("torch-cuda", "float16")
        assert [(f.backend, f.code) for f in failures] == [("tensorrt", "not_installed")]
        assert "torch_tensorrt cannot be imported" in str(failures[0])
    finally:
        backend.close()


def test_tensorrt_parity_and_engine_cache_reuse(model: LoadedModel, tmp_path: Path) -> None:
    pytest.importorskip("torch_tensorrt")
    from proxmo.encoder.tensorrt_backend import TensorRTBackend

    settings = EncoderSettings(backend="tensorrt", engine_cache_dir=str(tmp_path))
    first, failures = select_backend(settings, model=model)
    try:
        assert failures == [], failures
        assert isinstance(first, TensorRTBackend) and not first.cache_hit
        assert (first.cache_dir / "key.json").is_file()
        cos = row_cosines(first.encode(texts()), reference_embeddings(model, texts()))
        assert cos.min() >= 0.999
    finally:
        first.close()
    second, failures = select_backend(settings, model=model)
    try:
        assert failures == [] and isinstance(second, TensorRTBackend)
        assert second.cache_hit and second.cache_dir == first.cache_dir
    finally:
        second.close()
    # A corrupt cached engine must not cost the backend: Torch-TensorRT either ignores it, or
    # the load fails and the backend sets the cache aside (engines.failed-*) and rebuilds.
    for engine_file in (second.cache_dir / "engines").rglob("*"):
        if engine_file.is_file():
            engine_file.write_bytes(b"not an engine")
    third, failures = select_backend(settings, model=model)
    try:
        assert failures == [] and isinstance(third, TensorRTBackend), failures
        cos = row_cosines(third.encode(texts()), reference_embeddings(model, texts()))
        assert cos.min() >= 0.999
    finally:
        third.close()
