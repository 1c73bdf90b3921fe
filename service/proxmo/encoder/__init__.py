"""The sentence encoder behind ENCODER similarity: offline MiniLM, one backend chosen at start-up
(Torch-TensorRT, torch CUDA, torch CPU), and an Embedder that does as little work as it can.

    embedder = await create_embedder(EncoderSettings())
    await embedder.warmup()
    vectors = await embedder.embed(texts)      # float64 [n, d], L2-normalized
"""

from .base import BackendUnavailable, EncoderBackend
from .chain import EncoderUnavailable, load_backend, select_backend
from .embedder import Embedder, EmbedResult, PrefetchResult, create_embedder
from .model import ModelLoadError
from .settings import EncoderSettings

__all__ = [
    "BackendUnavailable",
    "EmbedResult",
    "Embedder",
    "EncoderBackend",
    "EncoderSettings",
    "EncoderUnavailable",
    "ModelLoadError",
    "PrefetchResult",
    "create_embedder",
    "load_backend",
    "select_backend",
]
