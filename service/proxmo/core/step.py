"""Step level: proximity-based soft aggregation (PSA), exact anchors (docs/algorithm.md section 3).

Cost stays per group: the only similarities computed are one group's distinct states against
themselves (m_g x m_g, m_g <= n_g), never the batch x batch similarity matrix, and they are
held a block of rows at a time (at most KERNEL_BLOCK_ENTRIES entries), so memory stays
O(m_g d) per group however large m_g is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
from threadpoolctl import ThreadpoolController

from proxmo.core.batch import StepBatch, ValidationError
from proxmo.core.config import Normalization, Scope
from proxmo.core.episode import STD_EPSILON

FeatureMatrix: TypeAlias = "np.ndarray | sp.csr_matrix | sp.csr_array"


@dataclass(frozen=True)
class StateFeatures:
    """What PSA needs: L2-normalized feature rows and, per step row, its feature row.

    Rows sharing a feature row are treated as one distinct state (their S_ij are equal), which
    is what makes the per-group kernel m_g x m_g. None instead of a StateFeatures means
    "A^S = 0" (e.g. an empty TF-IDF vocabulary).
    """

    matrix: FeatureMatrix  # [n_distinct, d], rows L2-normalized (or zero)
    row_index: np.ndarray  # int64[n_rows] -> row of `matrix`


def dense_features(unique_embeddings: np.ndarray, row_index: np.ndarray) -> StateFeatures:
    """StateFeatures from dense vectors (encoder or client embeddings): x / |x|, zero stays zero.

    `unique_embeddings` [n_distinct, d]; `row_index` int64[n_rows] maps each step row to its
    vector (for encoder embeddings of batch.states, pass batch.row_state).
    """
    matrix = np.asarray(unique_embeddings, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {matrix.shape}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalized = matrix / np.where(norms > 0.0, norms, 1.0)
    index = np.asarray(row_index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= matrix.shape[0]):
        raise ValueError("row_index points outside the embedding matrix")
    return StateFeatures(normalized, index)


def precomputed_features(batch: StepBatch) -> StateFeatures:
    """PRECOMPUTED similarity: the clients' state_embedding vectors, L2-normalized.

    Identical vectors are merged into one distinct state. Raises ValidationError naming the
    first step without an embedding.
    """
    if batch.embeddings is None:
        missing = np.flatnonzero(~batch.row_has_embedding)
        row = int(missing[0]) if missing.size else 0
        raise ValidationError(
            batch.row_field(row, "state_embedding"),
            "missing: PRECOMPUTED similarity needs an embedding on every step",
        )
    unique, row_index = np.unique(batch.embeddings, axis=0, return_inverse=True)
    return dense_features(unique, row_index.reshape(-1))


def _units(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct keys (sorted), each row's unit index, and the number of rows per unit."""
    unique, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    return unique, inverse, np.bincount(inverse, minlength=unique.shape[0])


# Similarity entries one kernel block holds at once (float64: 8 MiB). A group of up to 1,024
# distinct states is one block; a larger one is cut into blocks of rows, so PSA's memory stays
# O(m d) per group (its feature rows plus one block), never m x m.
KERNEL_BLOCK_ENTRIES = 1 << 20


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _canonical_csr(matrix: FeatureMatrix) -> sp.csr_matrix:
    """`matrix` as a CSR matrix without duplicate entries (shared, not copied, when it is one)."""
    csr = sp.csr_matrix(matrix)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


# A sparse-times-dense product costs about this many times a BLAS multiply-add per stored
# entry (measured on TF-IDF rows, AMD EPYC): a group's sparse rows go that way only when they
# hold fewer than 1/16 of their columns (long, varied texts), else densely through BLAS.
SPARSE_ENTRY_COST = 16


class _GroupGram:
    """One group's similarities S = V V^T, a block of rows at a time (`rows(a, b)` is
    S[a:b], dense), V being the group's feature rows.

    Dense features multiply through BLAS. Sparse (canonical CSR) features keep only the
    columns the group uses (its vocabulary; TF-IDF has at most 1,024 terms), then either go
    dense too (BLAS: a few hundred short texts) or, when rows are sparse enough, multiply as
    CSR rows times the dense V^T (work proportional to the stored entries, not the columns).
    """

    def __init__(self, matrix: np.ndarray | sp.csr_matrix, feature_rows: np.ndarray) -> None:
        self.left: np.ndarray | sp.csr_matrix
        self.right: np.ndarray
        if isinstance(matrix, np.ndarray):
            self.left = np.asarray(matrix[feature_rows], dtype=np.float64)
            self.right = self.left.T
            return
        m = feature_rows.shape[0]
        starts = matrix.indptr[feature_rows]
        lengths = matrix.indptr[feature_rows + 1] - starts
        # where the chosen rows' entries sit in indices/data, row after row
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        offsets += np.arange(offsets.shape[0])
        columns = matrix.indices[offsets]
        used = np.zeros(matrix.shape[1], dtype=bool)
        used[columns] = True
        rank = np.cumsum(used) - 1  # column -> its rank among the used ones
        n_columns, local = int(rank[-1]) + 1, rank[columns]
        row_of_entry = np.repeat(np.arange(m), lengths)
        values = matrix.data[offsets]
        if SPARSE_ENTRY_COST * offsets.shape[0] < n_columns * m:
            indptr = np.concatenate(([0], np.cumsum(lengths)))
            self.left = sp.csr_matrix((values, local, indptr), shape=(m, n_columns))
            self.right = np.zeros((n_columns, m))
            self.right[local, row_of_entry] = values
        else:
            self.left = np.zeros((m, n_columns))
            self.left[row_of_entry, local] = values
            self.right = self.left.T  # V[a:b] @ V.T: BLAS's syrk when a:b is every row

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.left[start:stop] @ self.right)


def _kernel_sums(
    matrix: FeatureMatrix,
    unit_feature: np.ndarray,
    unit_block: np.ndarray,
    gsum: np.ndarray,
    count: np.ndarray,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit u, over the units v of its block (units sorted by block), with
    E_uv = exp((S_uv - max_v S_uv) / tau): (E @ Gsum, E @ c, E^2 @ c).

    Subtracting the row maximum keeps every entry in [0, 1] with the maximum exactly 1, so the
    sums are finite for every tau > 0: a tiny tau sends (S_uv - max) / tau to -inf (an IEEE
    overflow, on purpose) and E to 0 except at the row's maximum; a huge tau sends E to 1.
    Rows are taken KERNEL_BLOCK_ENTRIES // m_b at a time, so memory is O(m_b d), not O(m_b^2).
    """
    features = _canonical_csr(matrix) if sp.issparse(matrix) else np.asarray(matrix)
    n_units = unit_feature.shape[0]
    sums = np.empty((n_units, 2))  # columns: E @ Gsum, E @ c
    square = np.empty(n_units)
    bounds = np.flatnonzero(np.diff(unit_block, prepend=-1, append=-1)).tolist()
    # One BLAS thread: a compute worker is one core's worth of work, and threading one
    # group's products only adds synchronization (several times slower on a busy machine).
    with np.errstate(over="ignore", under="ignore"), _blas().limit(limits=1, user_api="blas"):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            gram = _GroupGram(features, unit_feature[lo:hi])
            targets = np.column_stack((gsum[lo:hi], count[lo:hi]))
            step = max(1, KERNEL_BLOCK_ENTRIES // (hi - lo))
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                kernel = gram.rows(start - lo, stop - lo)
                kernel -= kernel.max(axis=1, keepdims=True)
                kernel /= tau
                np.exp(kernel, out=kernel)
                sums[start:stop] = kernel @ targets
                np.square(kernel, out=kernel)
                square[start:stop] = kernel @ targets[:, 1]
    return sums[:, 0], sums[:, 1], square


def soft_aggregation(
    returns: np.ndarray,
    batch: StepBatch,
    features: StateFeatures,
    tau: float,
    scope: Scope,
) -> tuple[np.ndarray, np.ndarray]:
    """PSA: A^S_i = G_i - B_i, B_i = sum_{j in C(i)} W_ij G_j, W_ij = softmax_j(S_ij / tau).

    S_ij = x_i . x_j. C(i): every row of i's group (GROUP) or only those with i's step index
    (SAME_STEP), i itself included. Rows sharing a distinct unit u (feature row, plus t under
    SAME_STEP) share B, so per block of candidates (a group, or a group's step), with
    E_uv = exp((S_uv - max_v S_uv) / tau) over the block's units, Gsum_v = sum of G over
    unit v and c_v its row count:

        B_u = (E @ Gsum)_u / (E @ c)_u,   effective neighbours 1 / sum_j W_ij^2
            = (E @ c)_u^2 / (E^2 @ c)_u.

    Returns (A^S, effective neighbours), both float64[n_rows]. Cost O(sum_b m_b^2 d), memory
    O(max_b m_b d + KERNEL_BLOCK_ENTRIES): never the batch x batch matrix, nor m_b x m_b for a
    block of more than 1,024 units.
    """
    n_feature_rows = int(features.matrix.shape[0])
    index = features.row_index
    if index.shape != (batch.n_rows,):
        raise ValueError(f"features.row_index has shape {index.shape}, expected ({batch.n_rows},)")
    block_of_row = batch.row_group
    if scope is Scope.SAME_STEP:
        block_of_row = block_of_row * (int(batch.row_t.max()) + 1) + batch.row_t
    unit_keys, row_unit, unit_count = _units(block_of_row * n_feature_rows + index)
    unit_feature = unit_keys % n_feature_rows
    unit_block = _units(unit_keys // n_feature_rows)[1]  # dense block ids, units sorted by block
    gsum = np.bincount(row_unit, weights=returns, minlength=unit_keys.shape[0])
    count = unit_count.astype(np.float64)
    weighted, weight, square = _kernel_sums(
        features.matrix, unit_feature, unit_block, gsum, count, tau
    )
    baseline = weighted / weight
    effective = weight * weight / square
    return returns - baseline[row_unit], effective[row_unit]


def anchor_ids(batch: StepBatch, scope: Scope) -> np.ndarray:
    """Exact anchor group of each row: same group and identical key (state_key, else state
    text), plus the same step index under SAME_STEP. int64[n_rows], dense ids."""
    n_keys = int(batch.row_key.max()) + 1
    keys = batch.row_group * n_keys + batch.row_key
    if scope is Scope.SAME_STEP:
        keys = keys * (int(batch.row_t.max()) + 1) + batch.row_t
    return _units(keys)[1]


def exact_anchor_advantages(
    returns: np.ndarray, anchors: np.ndarray, normalization: Normalization
) -> tuple[np.ndarray, np.ndarray]:
    """GiGPO step term over exact anchor groups; returns (A^S, anchor size per row).

    MEAN: A^S = G - mean(anchor); MEAN_STD: (G - mean) / (std + 1e-6), std unbiased and 1 for a
    single row. A singleton anchor gets 0 either way. This is also PSA's tau -> 0 limit (MEAN).
    """
    n_anchors = int(anchors.max()) + 1
    sizes = np.bincount(anchors, minlength=n_anchors).astype(np.float64)
    mean = np.bincount(anchors, weights=returns, minlength=n_anchors) / sizes
    centered = returns - mean[anchors]
    row_size = sizes[anchors]
    if normalization is Normalization.MEAN_STD:
        squares = np.bincount(anchors, weights=centered * centered, minlength=n_anchors)
        single = sizes <= 1.0
        std = np.where(single, 1.0, np.sqrt(squares / np.where(single, 1.0, sizes - 1.0)))
        centered = centered / (std[anchors] + STD_EPSILON)
    return np.where(row_size > 1.0, centered, 0.0), row_size


def singleton_fraction(batch: StepBatch) -> np.ndarray:
    """Per group: fraction of its rows whose exact anchor group (identical state) has one row."""
    anchors = anchor_ids(batch, Scope.GROUP)
    sizes = np.bincount(anchors)
    single = (sizes[anchors] == 1).astype(np.float64)
    group = batch.row_group
    rows = np.bincount(group, minlength=batch.n_groups)
    return np.bincount(group, weights=single, minlength=batch.n_groups) / rows


def group_distinct_states(batch: StepBatch, row_state: np.ndarray) -> np.ndarray:
    """Distinct states per group, int64[n_groups]: PSA's work in a group grows with their
    square (its kernel is m_g x m_g). `row_state` maps each row to its state: batch.row_state
    (distinct texts: TFIDF, ENCODER) or StateFeatures.row_index (PRECOMPUTED vectors)."""
    n_states = int(row_state.max()) + 1
    keys = np.unique(batch.row_group * n_states + row_state)
    return np.bincount(keys // n_states, minlength=batch.n_groups)
