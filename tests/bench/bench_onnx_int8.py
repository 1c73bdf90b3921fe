"""Gate for a faster CPU encoder (``make bench``): ONNX Runtime with int8 weights vs torch fp32.

An int8 encoder moves the embeddings, so cosine alone does not say whether it can replace fp32.
The gate is on what a trainer gets: the advantages of realistic batches (ALFWorld-like,
tests/bench/workload.py, 16 x 8 x 50, two seeds) with the ``proxmo`` preset at ENCODER
similarity, tau 0.05, computed from fp32 and from int8 embeddings of the same states:

    gate: max |A^S_int8 - A^S_fp32| <= 1e-2 over every row (A^S the PSA step term, before
          omega), on every batch

The int8 model: the service's own pipeline (transformer, mean pooling, normalization) exported
with ``torch.onnx.export`` (dynamic batch and length), its constant-weight MatMuls quantized to
int8 per output channel by ONNX Runtime's dynamic quantization (quantizing every MatMul, the
attention products included, or per tensor gave cosine ~0.90). Also reported: max |delta A|,
min/mean cosine, nearest-neighbour agreement, and sentences/s side by side (600 distinct
states, the backends alternating, best of N).

Result (docs/encoder.md): the gate FAILS, so the service has no int8 backend. onnxruntime is
not a dependency; this script runs where it is installed (``pip install onnxruntime onnx``)
and says so otherwise.
Run: .venv/bin/python tests/bench/bench_onnx_int8.py [--repeats N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import CpuMeter, machine  # noqa: E402
from proxmo.core import StepBatch, compute_advantages, dense_features, resolve_config  # noqa: E402
from proxmo.core.config import Similarity  # noqa: E402
from proxmo.encoder.base import EncoderBackend  # noqa: E402
from proxmo.encoder.model import LoadedModel, SentencePipeline, load_model  # noqa: E402
from proxmo.encoder.torch_backend import TorchBackend, choose_cpu_threads  # noqa: E402
from workload import alfworld_like_batch  # noqa: E402

GATE_STEP_ATOL = 1e-2
BATCHES = [(16, 0), (16, 1)]  # (groups, seed) of 8 x 50


class OnnxInt8Backend(EncoderBackend):
    """An ONNX Runtime CPU session over the int8-quantized pipeline (exported into ``cache``)."""

    name, device, dtype = "onnx-int8", "cpu", "int8"
    max_batch_size = 64  # as torch-cpu

    def __init__(self, model: LoadedModel, *, cache: Path, threads: int) -> None:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        super().__init__(model)
        pipeline = SentencePipeline(model.transformer, model.pooling_mode).eval()
        ids = torch.full((2, 16), 1000, dtype=torch.int64)
        axes = {0: "batch", 1: "length"}
        fp32, int8 = cache / "model-fp32.onnx", cache / "model-int8.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                pipeline, (ids, torch.ones_like(ids)), str(fp32),
                input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes,
                              "embedding": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(int8), sess_options=options, providers=["CPUExecutionProvider"])

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (embedding,) = self._session.run(
            ["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(embedding, dtype=np.float32)


def step_and_full(batch: StepBatch, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cfg = resolve_config("proxmo", default_similarity=Similarity.ENCODER)
    assert abs(cfg.tau - 0.05) < 1e-12, cfg.tau
    result = compute_advantages(batch, cfg,
                                features=dense_features(vectors.astype(np.float64),
                                                        batch.row_state))
    return result.step_advantages, result.advantages


def rate(backend: EncoderBackend, texts: list[str]) -> tuple[float, float]:
    with CpuMeter() as meter:
        backend.encode(texts)
    return len(texts) / meter.seconds, meter.other_cores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        print(f"bench_onnx_int8: skipped, onnxruntime and onnx are not installed ({e})")
        return 0
    threads = choose_cpu_threads(0)
    torch.set_num_threads(threads)
    model = load_model("")
    fp32 = TorchBackend(model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        int8 = OnnxInt8Backend(model, cache=Path(cache), threads=threads)
        export_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    passed = True
    for groups, seed in BATCHES:
        batch = StepBatch.from_trajectories(alfworld_like_batch(groups, 8, 50, seed=seed))
        states = list(batch.states)
        a = fp32.encode(states).astype(np.float64)
        b = int8.encode(states).astype(np.float64)
        cosine = np.sum(a * b, axis=1)
        sim_a, sim_b = a @ a.T, b @ b.T
        np.fill_diagonal(sim_a, -2.0)
        np.fill_diagonal(sim_b, -2.0)
        nn_agree = float(np.mean(sim_a.argmax(axis=1) == sim_b.argmax(axis=1)))
        step_a, full_a = step_and_full(batch, a)
        step_b, full_b = step_and_full(batch, b)
        d_step = float(np.max(np.abs(step_b - step_a)))
        d_full = float(np.max(np.abs(full_b - full_a)))
        ok = d_step <= GATE_STEP_ATOL
        passed &= ok
        rows.append({"batch": f"{groups}x8x50 seed {seed}", "distinct": len(states),
                     "min_cos": float(cosine.min()), "mean_cos": float(cosine.mean()),
                     "nn_agree": nn_agree, "max_abs_step_fp32": float(np.abs(step_a).max()),
                     "max_delta_step": d_step, "max_delta_A": d_full, "gate": ok})
        print(json.dumps(rows[-1]), flush=True)
    texts = list(StepBatch.from_trajectories(alfworld_like_batch(16, 8, 50)).states)[:600]
    fp32.encode(texts[:64])
    int8.encode(texts[:64])
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        for label, backend in (("torch-cpu float32", fp32), ("onnx-int8", int8)):
            sps, other = rate(backend, texts)
            if sps > best.get(label, (0.0, 0.0))[0]:
                best[label] = (sps, other)
    speedup = best["onnx-int8"][0] / best["torch-cpu float32"][0]
    print(f"\n## ONNX Runtime int8 vs torch fp32 ({machine()})\n")
    print(f"Export + quantization (once, then cached): {export_s:.1f} s.\n")
    print("| batch | distinct | min cos | mean cos | NN agree | max abs A^S (fp32) | "
          "max dA^S | max dA | gate dA^S <= 1e-2 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['distinct']} | {r['min_cos']:.4f} | {r['mean_cos']:.4f} | "
              f"{r['nn_agree']:.3f} | {r['max_abs_step_fp32']:.3f} | {r['max_delta_step']:.4f} "
              f"| {r['max_delta_A']:.4f} | {'pass' if r['gate'] else 'FAIL'} |")
    print(f"\n| backend | sentences/s (best of {args.repeats}) | other cores |")
    print("|---|---:|---:|")
    for label, (sps, other) in best.items():
        print(f"| {label} | {sps:.0f} | {other:.2f} |")
    print(f"\nint8 / fp32 throughput: {speedup:.2f}x; gate: {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "rates": best,
                                         "speedup": speedup, "gate": passed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
