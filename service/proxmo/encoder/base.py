"""The backend interface, plus what every backend shares: tokenization, micro-batch planning,
the parity gate and warm-up shapes.

A backend encodes padded token-id batches (``encode_ids``); ``encode`` tokenizes texts, sorts
them by token count and cuts them into micro-batches whose padded size
``batch_size x padded_length`` stays within ``max_batch_tokens``, so little work goes to padding.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .model import LoadedModel, SentencePipeline

log = logging.getLogger("proxmo.encoder")

# Called after each micro-batch with (texts, padded tokens, seconds): the Embedder's metrics.
BatchObserver = Callable[[int, int, float], None]

PARITY_MIN_COSINE = 0.999


class BackendUnavailable(RuntimeError):
    """A backend cannot be used here; the chain falls back and reports ``str(self)``.

    code: a short, fixed label for metrics (``no_cuda``, ``not_installed``, ``parity``, ...).
    """

    def __init__(self, backend: str, code: str, detail: str) -> None:
        super().__init__(f"{backend}: {detail}")
        self.backend = backend
        self.code = code
        self.detail = detail


class TextTokenizer:
    """The model's tokenizer with its truncation rule (max_seq_length) and lower-casing."""

    def __init__(self, model: LoadedModel) -> None:
        self._tokenizer = model.tokenizer
        self.max_seq_length = model.max_seq_length
        self._lower = model.do_lower_case
        pad = getattr(model.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        batch = [t.lower() for t in texts] if self._lower else list(texts)
        encoded = self._tokenizer(
            batch,
            truncation=True,
            max_length=self.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def pad(self, ids: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to ``length``: (input_ids int64 [b, length], attention_mask int64)."""
        input_ids = np.full((len(ids), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return input_ids, mask


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_micro_batches(
    lengths: Sequence[int], *, max_batch_tokens: int, max_batch_size: int, pad_multiple: int
) -> list[list[int]]:
    """Index lists, longest texts first; each batch has ``size x padded_len <= max_batch_tokens``
    (padded_len = its longest text rounded up to ``pad_multiple``) and ``size <= max_batch_size``.
    A text longer than the budget goes alone."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    padded = 0
    for index in order.tolist():
        if current and (
            (len(current) + 1) * padded > max_batch_tokens or len(current) >= max_batch_size
        ):
            batches.append(current)
            current = []
        if not current:
            padded = round_up(int(lengths[index]), pad_multiple)
        current.append(index)
    if current:
        batches.append(current)
    return batches


class EncoderBackend(ABC):
    """One way of running the encoder. Synchronous: the Embedder calls it on one worker thread.

    name: "tensorrt" | "torch-cuda" | "torch-cpu"; device: "cpu" or "cuda:0 (<GPU name>)";
    dtype: compute precision ("float32" | "bfloat16" | "float16").
    pad_multiple: sequence lengths are padded up to a multiple of this (GPU shape buckets).
    max_batch_size: most texts per micro-batch (a TensorRT profile's largest batch).
    """

    name: str
    device: str
    dtype: str
    pad_multiple: int = 1
    max_batch_size: int = 1024

    def __init__(self, model: LoadedModel) -> None:
        self.model_id = model.model_id
        self.model_sha256 = model.model_sha256
        self.dimension = model.dimension
        self.max_seq_length = model.max_seq_length
        self.tokenizer = TextTokenizer(model)

    @abstractmethod
    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 [b, d], L2-normalized, for one padded batch (int64 [b, L] inputs)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release device memory; the backend is not used afterwards."""

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_batch_tokens: int = 16384,
        on_batch: BatchObserver | None = None,
    ) -> np.ndarray:
        """float32 [n, d], L2-normalized, in the order of ``texts``."""
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        ids = self.tokenizer.token_ids(texts)
        plan = plan_micro_batches(
            [len(seq) for seq in ids],
            max_batch_tokens=max_batch_tokens,
            max_batch_size=self.max_batch_size,
            pad_multiple=self.pad_multiple,
        )
        for batch in plan:
            length = round_up(len(ids[batch[0]]), self.pad_multiple)
            input_ids, mask = self.tokenizer.pad([ids[i] for i in batch], length)
            start = time.perf_counter()
            out[batch] = self.encode_ids(input_ids, mask)
            if on_batch is not None:
                on_batch(len(batch), len(batch) * length, time.perf_counter() - start)
        return out

    def warmup_shapes(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        """(batch, seq_len) shapes to run once before serving. CPU: two small shapes (first
        calls allocate); GPU backends override with every sequence bucket."""
        return [(1, 16), (8, 64)]

    def warmup(self, max_batch_tokens: int) -> int:
        """Run every warm-up shape once; returns how many shapes ran."""
        shapes = self.warmup_shapes(max_batch_tokens)
        for batch, length in shapes:
            ids = np.full((batch, length), 1000, dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            self.encode_ids(ids, np.ones_like(ids))
        return len(shapes)


def gpu_warmup_shapes(
    *, max_seq_length: int, pad_multiple: int, max_batch_size: int, max_batch_tokens: int
) -> list[tuple[int, int]]:
    """Every sequence bucket (multiples of ``pad_multiple``) at batch 1, a mid batch and the
    largest batch the token budget allows at that length."""
    shapes: list[tuple[int, int]] = []
    for length in range(pad_multiple, round_up(max_seq_length, pad_multiple) + 1, pad_multiple):
        largest = max(1, min(max_batch_size, max_batch_tokens // length))
        for batch in sorted({1, max(1, largest // 4), largest}):
            shapes.append((batch, length))
    return shapes


# A fixed probe set for parity gates: ALFWorld-like observations from 2 tokens (the empty text)
# to past max_seq_length (truncated), so that padded batches mix very different lengths.
_ROOM = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 6, a "
    "cabinet 5, a cabinet 4, a cabinet 3, a cabinet 2, a cabinet 1, a coffeemachine 1, a "
    "countertop 3, a countertop 2, a countertop 1, a drawer 3, a drawer 2, a drawer 1, a fridge "
    "1, a garbagecan 1, a microwave 1, a shelf 3, a shelf 2, a shelf 1, a sinkbasin 1, a "
    "stoveburner 4, a stoveburner 3, a stoveburner 2, a stoveburner 1, and a toaster 1."
)
PROBE_TEXTS: tuple[str, ...] = (
    "",
    "Nothing happens.",
    "You pick up the apple 1 from the countertop 1.",
    "You arrive at cabinet 2. The cabinet 2 is closed.",
    "You open the fridge 1. The fridge 1 is open. In it, you see a egg 2, a lettuce 1, a "
    "potato 3, and a tomato 1.",
    _ROOM + " Your task is to: put a clean mug in coffeemachine.",
    "You heat the potato 1 using the microwave 1.",
    "You arrive at countertop 1. On the countertop 1, you see a bread 1, a butterknife 2, a "
    "cellphone 1, a creditcard 1, a knife 1, a lettuce 2, a peppershaker 2, and a spoon 1.",
    "The stock market closed higher on Tuesday as technology shares rallied.",
    (_ROOM + " ") * 4,
    "You clean the mug 1 using the sinkbasin 1. Think: now I put it in the coffeemachine.",
    "You are carrying: a saltshaker 1. Step 17 of 50.",
)


def reference_embeddings(model: LoadedModel, texts: Sequence[str] = PROBE_TEXTS) -> np.ndarray:
    """fp32 eager on the CPU, one text at a time (no padding at all): the parity reference."""
    pipeline = SentencePipeline(model.transformer, model.pooling_mode).eval()
    tokenizer = TextTokenizer(model)
    rows = []
    with torch.inference_mode():
        for seq in tokenizer.token_ids(texts):
            ids, mask = tokenizer.pad([seq], len(seq))
            rows.append(pipeline(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0])
    return np.stack(rows).astype(np.float32)


def check_parity(
    backend: EncoderBackend,
    reference: np.ndarray,
    texts: Sequence[str] = PROBE_TEXTS,
    *,
    batch_size: int = 6,
    min_cosine: float = PARITY_MIN_COSINE,
) -> float:
    """Encode ``texts`` in padded batches of mixed lengths (input order, no length sort, so a
    wrong padding mask shows) and require cosine >= min_cosine to ``reference`` on every row.
    Returns the smallest cosine; raises BackendUnavailable(code="parity") below the gate."""
    tokenizer = backend.tokenizer
    ids = tokenizer.token_ids(texts)
    got = np.empty_like(reference)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        length = round_up(max(len(s) for s in chunk), backend.pad_multiple)
        input_ids, mask = tokenizer.pad(chunk, length)
        got[start : start + len(chunk)] = backend.encode_ids(input_ids, mask)
    cosines = np.sum(got.astype(np.float64) * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    worst = float(np.min(cosines)) if len(cosines) else 1.0
    if not math.isfinite(worst) or worst < min_cosine:
        row = int(np.nanargmin(cosines)) if np.isfinite(cosines).any() else 0
        raise BackendUnavailable(
            backend.name,
            "parity",
            f"{backend.dtype} on {backend.device} failed the parity gate: cosine to fp32 "
            f"{worst:.6f} < {min_cosine} on probe row {row} (padded batches)",
        )
    log.info("%s %s parity vs fp32: min cosine %.6f", backend.name, backend.dtype, worst)
    return worst
