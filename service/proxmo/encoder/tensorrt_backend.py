"""Torch-TensorRT backend: the whole sentence pipeline compiled into one TensorRT engine.

``torch_tensorrt`` is optional (the ``[gpu]`` extra, or the NVIDIA PyTorch image) and imported
only here, only when this backend is tried. The pitfalls handled (serving-anchors.md section 4):

- dynamic shapes: exported with ``torch.export`` using ONE batch Dim and ONE sequence Dim shared
  by ``input_ids`` and ``attention_mask`` (independent Dims raise ConstraintViolationError),
  example inputs at the opt shape (a dim traced at 1 is specialized; min must be < opt);
- int32 token ids, as in Torch-TensorRT's BERT examples;
- precision: versions that offer ``enable_autocast`` (2.10+) get it with float16 and
  ``use_explicit_typing=True``; older ones (<= 2.9) get ``enabled_precisions={float16}`` with
  ``use_explicit_typing=False``; a version with neither gets a model cast to half. From 2.10
  until its removal (#4195), ``enabled_precisions`` is still accepted but ``use_explicit_typing``
  defaults to True and then rejects any precision but float32 (AssertionError, pytorch/TensorRT
  #4070), so autocast must win where both exist;
- ``attn_bias_is_causal=False`` where offered: its default True rewrites a padding bias into a
  causal mask, which is wrong for a bidirectional encoder;
- engine caches are namespaced by GPU, TensorRT, torch-tensorrt, torch, model, dtype and shape
  profile, because Torch-TensorRT's own cache key includes none of the first four. Torch-TensorRT
  only writes and reads its engine cache for refittable engines (``immutable_weights=False``;
  the default True silently disables the cache), since a cached engine is stored weight-stripped
  and refitted with the current weights on load.

The chain only uses this backend after the parity gate (cosine >= 0.999 per row against fp32 on
padded probe batches) and a warm-up over every sequence bucket.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import BackendUnavailable, EncoderBackend, gpu_warmup_shapes, round_up
from .model import LoadedModel, SentencePipeline

log = logging.getLogger("proxmo.encoder")

NAME = "tensorrt"
PAD_MULTIPLE = 16
MAX_BATCH = 256
OPT_BATCH = 64
OPT_SEQ = 64


@dataclass(frozen=True)
class ShapeProfile:
    """The one TensorRT optimization profile: [min, opt, max] of batch and padded sequence."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    @staticmethod
    def for_model(max_seq_length: int, max_positions: int) -> ShapeProfile:
        max_seq = min(round_up(max_seq_length, PAD_MULTIPLE), max_positions)
        return ShapeProfile(
            min_batch=1, opt_batch=OPT_BATCH, max_batch=MAX_BATCH,
            min_seq=PAD_MULTIPLE, opt_seq=min(OPT_SEQ, max_seq), max_seq=max_seq,
        )

    def label(self) -> str:
        return (
            f"b{self.min_batch}-{self.opt_batch}-{self.max_batch}"
            f"_s{self.min_seq}-{self.opt_seq}-{self.max_seq}"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def engine_cache_dir(
    root: str | Path,
    *,
    gpu_name: str,
    compute_capability: tuple[int, int],
    tensorrt_version: str,
    torch_tensorrt_version: str,
    torch_version: str,
    model_sha256: str,
    dtype: str,
    profile: ShapeProfile,
) -> Path:
    """``root/<gpu>-sm<cc>/trt<v>_torchtrt<v>_torch<v>/<model sha>-<dtype>-<profile>``.

    Engines are specific to the GPU architecture and TensorRT version, so an engine built
    elsewhere is never picked up by mistake."""
    major, minor = compute_capability
    return (
        Path(root).expanduser()
        / f"{_slug(gpu_name)}-sm{major}{minor}"
        / f"trt{_slug(tensorrt_version)}_torchtrt{_slug(torch_tensorrt_version)}"
        f"_torch{_slug(torch_version)}"
        / f"{model_sha256[:16]}-{dtype}-{profile.label()}"
    )


def build_compile_kwargs(
    params: Collection[str], *, dtype: str, cache_dir: Path
) -> tuple[dict[str, Any], bool]:
    """Keyword arguments for ``torch_tensorrt.dynamo.compile`` given the names its installed
    version accepts; also whether the module itself must be cast to half before export."""
    kwargs: dict[str, Any] = {}
    cast_to_half = False
    if dtype == "float16":
        if "enable_autocast" in params:  # 2.10+: strongly typed; autocast keeps softmax etc. fp32
            kwargs["enable_autocast"] = True
            kwargs["autocast_low_precision_type"] = torch.float16
            kwargs["use_explicit_typing"] = True  # autocast needs it (the default from 2.10)
        elif "enabled_precisions" in params:  # <= 2.9: weakly typed, TRT may pick fp16 kernels
            kwargs["enabled_precisions"] = {torch.float16}
            kwargs["use_explicit_typing"] = False  # the default there; True rejects float16
        else:
            cast_to_half = True
    if "attn_bias_is_causal" in params:
        kwargs["attn_bias_is_causal"] = False
    if "engine_cache_dir" in params:
        kwargs["cache_built_engines"] = True
        kwargs["reuse_cached_engines"] = True
        kwargs["engine_cache_dir"] = str(cache_dir / "engines")
        # The engine cache is only used for refittable engines (see the module docstring).
        if "immutable_weights" in params:
            kwargs["immutable_weights"] = False
        elif "make_refittable" in params:  # the name before 2.6
            kwargs["make_refittable"] = True
    if "timing_cache_path" in params:
        kwargs["timing_cache_path"] = str(cache_dir / "timing.cache")
    if "truncate_double" in params:
        kwargs["truncate_double"] = True
    return {k: v for k, v in kwargs.items() if k in params}, cast_to_half


def export_pipeline(
    pipeline: torch.nn.Module, profile: ShapeProfile, device: torch.device
) -> torch.export.ExportedProgram:
    """torch.export with one batch Dim and one sequence Dim shared by both inputs; the example
    inputs sit at the opt shape (never at min, never a dimension of 1)."""
    batch = torch.export.Dim("batch", min=profile.min_batch, max=profile.max_batch)
    seq = torch.export.Dim("seq", min=profile.min_seq, max=profile.max_seq)
    shape = (profile.opt_batch, profile.opt_seq)
    input_ids = torch.randint(1000, 2000, shape, dtype=torch.int32, device=device)
    attention_mask = torch.ones(shape, dtype=torch.int32, device=device)
    attention_mask[1::2, profile.opt_seq // 2 :] = 0  # padded rows in the example, too
    with torch.no_grad():
        return torch.export.export(
            pipeline,
            (input_ids, attention_mask),
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            strict=False,
        )


def _tensorrt_version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 - only a cache-key component
        return "unknown"


class TensorRTBackend(EncoderBackend):
    name = NAME
    pad_multiple = PAD_MULTIPLE
    max_batch_size = MAX_BATCH

    def __init__(self, model: LoadedModel, *, dtype: str, engine_cache_root: str) -> None:
        super().__init__(model)
        if not torch.cuda.is_available():
            raise BackendUnavailable(NAME, "no_cuda", "CUDA is not available")
        if dtype not in ("float16", "float32"):
            raise BackendUnavailable(
                NAME, "unsupported_dtype", f"{dtype} is not built here (float16 or float32)"
            )
        try:
            import torch_tensorrt
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken TensorRT install
            raise BackendUnavailable(
                NAME, "not_installed",
                f"torch_tensorrt cannot be imported ({type(e).__name__}: {e}); install the "
                "[gpu] extra or run the NVIDIA PyTorch image",
            ) from e
        self.dtype = dtype
        self._device = torch.device("cuda", 0)
        gpu_name = torch.cuda.get_device_name(0)
        self.device = f"cuda:0 ({gpu_name})"
        max_positions = int(getattr(model.transformer.config, "max_position_embeddings", 512))
        self.profile = ShapeProfile.for_model(model.max_seq_length, max_positions)
        self.cache_dir = engine_cache_dir(
            engine_cache_root,
            gpu_name=gpu_name,
            compute_capability=torch.cuda.get_device_capability(0),
            tensorrt_version=_tensorrt_version(),
            torch_tensorrt_version=str(getattr(torch_tensorrt, "__version__", "unknown")),
            torch_version=torch.__version__,
            model_sha256=model.model_sha256,
            dtype=dtype,
            profile=self.profile,
        )
        self.cache_hit = (self.cache_dir / "engines").is_dir() and any(
            (self.cache_dir / "engines").iterdir()
        )
        try:
            try:
                self._module = self._compile(torch_tensorrt, model)
            except Exception as e:  # noqa: BLE001
                if not self.cache_hit:
                    raise
                # A cached engine that no longer loads or refits would fail every start: set
                # it aside (kept for inspection) and build once from scratch.
                aside = self.cache_dir / f"engines.failed-{int(time.time())}"
                log.warning("tensorrt: compiling with the cached engine failed (%s: %s); "
                            "moved it to %s, building anew", type(e).__name__, e, aside)
                (self.cache_dir / "engines").rename(aside)
                self.cache_hit = False
                self._module = self._compile(torch_tensorrt, model)
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - export/lowering/build errors all mean "fall back"
            raise BackendUnavailable(
                NAME, "compile_failed", f"compilation failed: {type(e).__name__}: {e}"
            ) from e

    def _compile(self, torch_tensorrt: Any, model: LoadedModel) -> Any:
        compile_fn = torch_tensorrt.dynamo.compile
        params = set(inspect.signature(compile_fn).parameters)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        kwargs, cast_to_half = build_compile_kwargs(
            params, dtype=self.dtype, cache_dir=self.cache_dir
        )
        transformer = copy.deepcopy(model.transformer).to(self._device)
        if cast_to_half:
            transformer = transformer.half()
        pipeline = SentencePipeline(transformer, model.pooling_mode).eval()
        exported = export_pipeline(pipeline, self.profile, self._device)
        p = self.profile
        inputs = [
            torch_tensorrt.Input(
                min_shape=(p.min_batch, p.min_seq),
                opt_shape=(p.opt_batch, p.opt_seq),
                max_shape=(p.max_batch, p.max_seq),
                dtype=torch.int32,
            )
            for _ in range(2)
        ]
        inputs_arg = "arg_inputs" if "arg_inputs" in params else "inputs"
        log.info(
            "tensorrt: compiling %s (%s, profile %s, cache %s, %s) with %s",
            model.model_id, self.dtype, p.label(), self.cache_dir,
            "cached engine found" if self.cache_hit else "no cached engine",
            sorted(kwargs),
        )
        (self.cache_dir / "key.json").write_text(
            json.dumps(
                {"model_id": model.model_id, "model_sha256": model.model_sha256,
                 "dtype": self.dtype, "device": self.device, "profile": asdict(p),
                 "compile_kwargs": sorted(kwargs)},
                indent=2,
            )
        )
        compiled = compile_fn(exported, **{inputs_arg: inputs}, **kwargs)
        del transformer, pipeline, exported
        torch.cuda.empty_cache()
        return compiled

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self._device, torch.int32, non_blocking=True)
            mask = torch.from_numpy(attention_mask).to(
                self._device, torch.int32, non_blocking=True
            )
            out = self._module(ids, mask)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    def warmup_shapes(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        return gpu_warmup_shapes(
            max_seq_length=self.profile.max_seq,
            pad_multiple=self.pad_multiple,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=max_batch_tokens,
        )

    def close(self) -> None:
        # Idempotent; a failure here during a fallback is caught by the chain.
        self.__dict__.pop("_module", None)
        torch.cuda.empty_cache()
