"""Backends on the real model: parity with sentence-transformers, micro-batching, the parity
gate, bf16, the fallback chain, settings errors, and the CPU-runnable part of the TensorRT path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from proxmo.encoder import BackendUnavailable, Embedder, EncoderSettings, select_backend
from proxmo.encoder import torch_backend as tb
from proxmo.encoder.base import (
    PROBE_TEXTS,
    check_parity,
    plan_micro_batches,
    reference_embeddings,
)
from proxmo.encoder.chain import Candidate, candidate_chain
from proxmo.encoder.model import LoadedModel, ModelLoadError, SentencePipeline, load_model
from proxmo.encoder.tensorrt_backend import (
    ShapeProfile,
    build_compile_kwargs,
    engine_cache_dir,
    export_pipeline,
)
from proxmo.encoder.torch_backend import TorchBackend

from .alfworld_states import alfworld_groups

PACKAGED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
NO_CUDA = not torch.cuda.is_available()


def texts_sample(n: int = 24) -> list[str]:
    flat = [s for g in alfworld_groups(4, 4, 20, seed=3) for tr in g for s in tr]
    return list(dict.fromkeys(flat))[:n] + list(PROBE_TEXTS)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_packaged_model_identity(model: LoadedModel) -> None:
    assert model.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert model.model_sha256 == PACKAGED_SHA256
    assert model.dimension == 384
    assert model.max_seq_length == 256
    assert model.pooling_mode == "mean"


def test_parity_with_sentence_transformers_encode(cpu_backend: TorchBackend, st_model: Any) -> None:
    texts = texts_sample()
    ours = cpu_backend.encode(texts)
    theirs = st_model.encode(texts, batch_size=32, convert_to_numpy=True)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = row_cosines(ours, theirs)
    assert cos.min() >= 0.9999, f"row {int(cos.argmin())}: cosine {cos.min()}"
    # The encoder separates meanings: a related sentence is closer than an unrelated one.
    a, b, c = cpu_backend.encode([
        "You pick up the apple from the countertop 1.",
        "The apple was taken from the kitchen counter.",
        "The stock market closed higher on Tuesday.",
    ])
    assert float(a @ b) > 0.6 > 0.1 > float(a @ c)


def test_micro_batches_do_not_change_embeddings(cpu_backend: TorchBackend) -> None:
    texts = texts_sample(24)
    whole = cpu_backend.encode(texts, max_batch_tokens=1 << 20)
    batches: list[tuple[int, int]] = []
    tiny = cpu_backend.encode(
        texts, max_batch_tokens=256, on_batch=lambda n, tok, s: batches.append((n, tok))
    )
    assert len(batches) > 5 and all(tok <= 256 or n == 1 for n, tok in batches)
    one_by_one = np.stack([cpu_backend.encode([t])[0] for t in texts[:6]])
    np.testing.assert_allclose(tiny, whole, atol=1e-6)
    np.testing.assert_allclose(one_by_one, whole[:6], atol=1e-6)


def test_plan_micro_batches_covers_each_text_once_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 257, size=500).tolist()
    for budget, cap, pad in [(16384, 1024, 1), (2048, 64, 16), (256, 1024, 16)]:
        plan = plan_micro_batches(
            lengths, max_batch_tokens=budget, max_batch_size=cap, pad_multiple=pad
        )
        flat = [i for batch in plan for i in batch]
        assert sorted(flat) == list(range(len(lengths)))
        for batch in plan:
            padded = -(-lengths[batch[0]] // pad) * pad
            assert lengths[batch[0]] == max(lengths[i] for i in batch)  # longest first
            assert len(batch) <= cap
            assert len(batch) * padded <= budget or len(batch) == 1
        # Length-sorted: padding waste stays small.
        padded_tokens = sum(len(b) * (-(-lengths[b[0]] // pad) * pad) for b in plan)
        assert padded_tokens <= 1.25 * sum(lengths) + pad * len(lengths)
    assert plan_micro_batches([], max_batch_tokens=256, max_batch_size=8, pad_multiple=1) == []


def test_parity_gate_catches_a_padding_bug(model: LoadedModel, cpu_backend: TorchBackend) -> None:
    reference = reference_embeddings(model)
    assert check_parity(cpu_backend, reference) > 0.99999

    class IgnoresPadding(TorchBackend):
        """What a causal/ignored mask does: padded positions leak into every row."""

        def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return super().encode_ids(input_ids, np.ones_like(attention_mask))

    broken = IgnoresPadding(model, device="cpu", dtype="float32")
    with pytest.raises(BackendUnavailable) as info:
        check_parity(broken, reference)
    assert info.value.code == "parity" and "cosine to fp32" in str(info.value)

    def build(candidate: Candidate, m: LoadedModel, s: EncoderSettings) -> TorchBackend:
        if candidate.dtype == "bfloat16":
            return IgnoresPadding(m, device="cpu", dtype="bfloat16")
        return TorchBackend(m, device="cpu", dtype=candidate.dtype)

    if tb.cpu_has_bf16():
        settings = EncoderSettings(backend="torch-cpu", dtype="bfloat16", threads=1)
        backend, failures = select_backend(settings, model=model, build=build)
        assert (backend.name, backend.dtype) == ("torch-cpu", "float32")
        assert [(f.backend, f.code) for f in failures] == [("torch-cpu", "parity")]


@pytest.mark.skipif(not tb.cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_bf16_on_cpu_passes_its_gate(model: LoadedModel) -> None:
    settings = EncoderSettings(backend="torch-cpu", dtype="bfloat16", threads=1)
    backend, failures = select_backend(settings, model=model)
    assert failures == []
    assert (backend.name, backend.dtype) == ("torch-cpu", "bfloat16")
    texts = texts_sample(16)
    cos = row_cosines(backend.encode(texts), reference_embeddings(model, texts))
    assert cos.min() >= 0.999


def test_bf16_refused_without_cpu_support(model: LoadedModel, monkeypatch: Any) -> None:
    monkeypatch.setattr(tb, "cpu_has_bf16", lambda: False)
    settings = EncoderSettings(backend="torch-cpu", dtype="bfloat16", threads=1)
    backend, failures = select_backend(settings, model=model)
    assert (backend.name, backend.dtype) == ("torch-cpu", "float32")
    assert [(f.backend, f.code) for f in failures] == [("torch-cpu", "cpu_lacks_bf16")]
    assert "avx512_bf16" in str(failures[0])


def test_float16_on_cpu_falls_back_with_reason(model: LoadedModel) -> None:
    settings = EncoderSettings(backend="torch-cpu", dtype="float16", threads=1)
    backend, failures = select_backend(settings, model=model)
    assert (backend.name, backend.dtype) == ("torch-cpu", "float32")
    assert failures[0].code == "unsupported_dtype"


@pytest.mark.skipif(not NO_CUDA, reason="checks the chain on a machine without CUDA")
def test_tensorrt_without_cuda_falls_back_to_cpu(model: LoadedModel) -> None:
    settings = EncoderSettings(backend="tensorrt", threads=1)
    backend, failures = select_backend(settings, model=model)
    assert (backend.name, backend.device, backend.dtype) == ("torch-cpu", "cpu", "float32")
    assert [str(f) for f in failures] == [
        "tensorrt: CUDA is not available",
        "torch-cuda: CUDA is not available",
    ]
    embedder = Embedder(backend, settings, fallbacks=failures)
    info = embedder.info()
    assert info["backend"] == "torch-cpu" and len(info["fallback_reasons"]) == 2
    fallback = embedder.metrics.fallbacks.labels(from_backend="tensorrt", reason="no_cuda")
    assert fallback._value.get() == 1
    # auto without CUDA: torch-cpu is the first choice, so nothing is reported as a fallback.
    assert candidate_chain(EncoderSettings(), cuda=False) == [Candidate("torch-cpu", "float32")]


def test_candidate_chains() -> None:
    assert candidate_chain(EncoderSettings(), cuda=True) == [
        Candidate("tensorrt", "float16"),
        Candidate("torch-cuda", "float16"),
        Candidate("torch-cpu", "float32"),
    ]
    assert candidate_chain(EncoderSettings(backend="torch-cuda", dtype="float32"), cuda=True) == [
        Candidate("torch-cuda", "float32"),
        Candidate("torch-cpu", "float32"),
    ]
    assert candidate_chain(EncoderSettings(dtype="bfloat16"), cuda=False) == [
        Candidate("torch-cpu", "bfloat16"),
        Candidate("torch-cpu", "float32"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backend": "onnx"}, "encoder.backend"),
        ({"dtype": "int8"}, "encoder.dtype"),
        ({"threads": -1}, "encoder.threads"),
        ({"max_batch_tokens": 10}, "encoder.max_batch_tokens"),
        ({"lru_size": -5}, "encoder.lru_size"),
        ({"redis_cache_ttl_s": 0}, "encoder.redis_cache_ttl_s"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        EncoderSettings(**kwargs)


def test_bad_model_path_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="^encoder.model_path: .*modules.json"):
        load_model(str(tmp_path))


def test_thread_choice() -> None:
    assert tb.choose_cpu_threads(3) == 3
    auto = tb.choose_cpu_threads(0)
    cores = tb.available_cores()
    assert 1 <= auto <= max(1, cores) and auto <= 8
    assert auto == cores if cores <= 2 else auto == min(8, cores - 1)


# --- The TensorRT path, as far as it runs without CUDA ------------------------------------


def test_compile_kwargs_follow_the_installed_signature(tmp_path: Path) -> None:
    cache = {"engine_cache_dir", "cache_built_engines", "reuse_cached_engines",
             "immutable_weights"}
    # 2.9: weakly typed (use_explicit_typing defaults to False).
    old = {"inputs", "enabled_precisions", "use_explicit_typing", "truncate_double"} | cache
    kwargs, cast = build_compile_kwargs(old, dtype="float16", cache_dir=tmp_path)
    assert kwargs["enabled_precisions"] == {torch.float16} and not cast
    assert kwargs["use_explicit_typing"] is False
    assert "attn_bias_is_causal" not in kwargs  # absent from that version: never passed
    assert kwargs["reuse_cached_engines"] and kwargs["engine_cache_dir"].startswith(str(tmp_path))
    # Torch-TensorRT skips its engine cache for non-refittable (immutable) engines.
    assert kwargs["immutable_weights"] is False

    # 2.10 on (until #4195): enabled_precisions still accepted, but use_explicit_typing defaults
    # to True and then rejects {float16}; autocast must be chosen instead.
    mid = {"arg_inputs", "enabled_precisions", "use_explicit_typing", "enable_autocast",
           "autocast_low_precision_type"} | cache
    kwargs, cast = build_compile_kwargs(mid, dtype="float16", cache_dir=tmp_path)
    assert "enabled_precisions" not in kwargs and not cast
    assert kwargs["enable_autocast"] is True and kwargs["use_explicit_typing"] is True
    assert kwargs["autocast_low_precision_type"] == torch.float16

    new = {"arg_inputs", "enable_autocast", "autocast_low_precision_type", "attn_bias_is_causal"}
    kwargs, cast = build_compile_kwargs(new, dtype="float16", cache_dir=tmp_path)
    assert kwargs == {
        "enable_autocast": True,
        "autocast_low_precision_type": torch.float16,
        "attn_bias_is_causal": False,
    }
    assert not cast
    kwargs, cast = build_compile_kwargs({"arg_inputs"}, dtype="float16", cache_dir=tmp_path)
    assert kwargs == {} and cast  # strongly typed, no autocast: the model is cast to half


def test_engine_cache_dir_is_keyed_by_everything_that_invalidates_an_engine() -> None:
    profile = ShapeProfile.for_model(256, 512)
    base = dict(
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), tensorrt_version="10.16.0",
        torch_tensorrt_version="2.13.0", torch_version="2.13.0", model_sha256=PACKAGED_SHA256,
        dtype="float16", profile=profile,
    )
    root = engine_cache_dir("/cache", **base)  # type: ignore[arg-type]
    assert str(root).startswith("/cache/nvidia-h100-80gb-hbm3-sm90/trt10.16.0_torchtrt2.13.0")
    changes = [
        {"gpu_name": "NVIDIA L4"}, {"compute_capability": (8, 9)}, {"tensorrt_version": "10.17"},
        {"torch_tensorrt_version": "2.14.0"}, {"model_sha256": "0" * 64}, {"dtype": "float32"},
        {"profile": ShapeProfile.for_model(128, 512)},
    ]
    for change in changes:
        assert engine_cache_dir("/cache", **{**base, **change}) != root  # type: ignore[arg-type]


def test_export_with_shared_dynamic_dims_keeps_parity(model: LoadedModel) -> None:
    """The torch.export step of the TensorRT path, on the CPU: one batch Dim and one sequence
    Dim shared by both inputs; the exported program runs shapes it was not traced at."""
    profile = ShapeProfile.for_model(model.max_seq_length, 512)
    pipeline = SentencePipeline(model.transformer, model.pooling_mode).eval()
    exported = export_pipeline(pipeline, profile, torch.device("cpu")).module()
    reference = reference_embeddings(model)
    tokenizer_backend = TorchBackend(model, device="cpu", dtype="float32")
    ids = tokenizer_backend.tokenizer.token_ids(PROBE_TEXTS)
    for batch_size in (1, 5):
        rows = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            length = -(-max(len(s) for s in chunk) // 16) * 16
            input_ids, mask = tokenizer_backend.tokenizer.pad(chunk, length)
            with torch.no_grad():
                out = exported(
                    torch.from_numpy(input_ids).int(), torch.from_numpy(mask).int()
                )
            rows.append(out.numpy())
        assert row_cosines(np.concatenate(rows), reference).min() >= 0.9999
