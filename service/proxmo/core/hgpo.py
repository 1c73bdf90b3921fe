"""HGPO step term: history-keyed groups weighted by key length (docs/algorithm.md section 4a).

A row (trajectory i, step t) belongs, for each k = 1 .. min(K + 1, t + 1), to the group of rows
of its group whose last k states s_{t-k+1} .. s_t are identical to its own (its *history key*
of length k; keys carry no time index). k = 1 is GiGPO's anchor. Per key with at least 2 rows,
with mean mu and population std sigma (ddof = 0) of the returns G over its rows:

    value_k = G - mu                      (MEAN)
    value_k = (G - mu) / (sigma + 1e-6)   (MEAN_STD)

Per row, over its kept keys whose value is not exactly 0, with w_k = (k + 1)^alpha:

    A = sum_k w_k value_k / (sum_k w_k + 1e-6)        (0 when no key remains)

Optionally (base group) the row's GiGPO episode value joins as one more item with k = 0 and
weight 1^alpha = 1, under the same zero rule.

Vectorized level by level: the length-k key of a row is the pair (length-(k-1) key of the row
before it in its trajectory, its own state), numbered densely with np.unique, so each level
costs O(rows log rows) and never materializes a k-tuple. A length-k key can only be shared by
rows whose length-(k-1) keys (their own and their predecessor's) were shared, so each level only
looks at those rows and the loop stops at the first level where no key is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proxmo.core.batch import StepBatch
from proxmo.core.config import Normalization
from proxmo.core.episode import STD_EPSILON

# The +1e-6 of verl-agent's weight normalization w = (k+1)^alpha / (sum + 1e-6).
WEIGHT_EPSILON = 1e-6


@dataclass(frozen=True)
class HistoryAdvantages:
    """The HGPO aggregate per row and what explains it."""

    values: np.ndarray  # float64[n_rows]: A, the weighted mean of the row's nonzero items
    long_history: np.ndarray  # bool[n_rows]: a nonzero item came from a key with k >= 2
    anchor_size: np.ndarray  # float64[n_rows]: rows sharing the row's k = 1 key (its anchor)


def _dense(keys: np.ndarray) -> np.ndarray:
    """Dense ids 0..m-1 of int64 keys."""
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def _key_values(
    returns: np.ndarray, ids: np.ndarray, normalization: Normalization
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its value in its key and whether the key has >= 2 rows (else the value is 0).

    The mean is sum / n, except for a key whose returns are all equal: its mean is that value
    itself (sum / n of equal values can be off by an ulp), so its values are exactly 0 and the
    zero rule drops them.
    """
    n_keys = int(ids.max()) + 1
    counts = np.bincount(ids, minlength=n_keys).astype(np.float64)
    lowest = np.full(n_keys, np.inf)
    highest = np.full(n_keys, -np.inf)
    np.minimum.at(lowest, ids, returns)
    np.maximum.at(highest, ids, returns)
    mean = np.bincount(ids, weights=returns, minlength=n_keys) / counts
    mean = np.where(lowest == highest, lowest, mean)
    centered = returns - mean[ids]
    if normalization is Normalization.MEAN_STD:
        variance = np.bincount(ids, weights=centered * centered, minlength=n_keys) / counts
        centered = centered / (np.sqrt(variance)[ids] + STD_EPSILON)
    kept = counts[ids] >= 2.0
    return np.where(kept, centered, 0.0), kept


def history_key_advantages(
    returns: np.ndarray,
    batch: StepBatch,
    *,
    history_length: int,
    alpha: float,
    normalization: Normalization,
    base: np.ndarray | None = None,
) -> HistoryAdvantages:
    """HGPO's A per row (module docstring) for K = `history_length`, key weights (k + 1)^alpha
    and `normalization` within each key; `base` (float64[n_rows]) is the optional k = 0 item.

    Keys use the batch's exact identity (`state_key` when given, else the state text) within
    each group. Cost O(rows log rows) per level for at most K + 1 levels; memory O(rows).
    """
    n_rows = batch.n_rows
    numerator = np.zeros(n_rows)
    denominator = np.zeros(n_rows)
    long_history = np.zeros(n_rows, dtype=bool)
    if base is not None:
        present = base != 0.0
        numerator += np.where(present, base, 0.0)
        denominator += present  # weight 1^alpha of the k = 0 item

    n_states = int(batch.row_key.max()) + 1
    ids = _dense(batch.row_group * n_states + batch.row_key)  # length-1 keys, every row
    rows = np.arange(n_rows)
    anchor_size = np.bincount(ids)[ids].astype(np.float64)
    key_of_row = np.full(n_rows, -1, dtype=np.int64)
    shared = np.zeros(n_rows, dtype=bool)
    for k in range(1, history_length + 2):
        if k > 1:
            # Candidates: rows at t >= k - 1 whose own and predecessor's length-(k-1) keys
            # were shared; a row's length-k key = (predecessor's length-(k-1) key, its state).
            previous = np.maximum(np.arange(n_rows) - 1, 0)
            candidate = (batch.row_t >= k - 1) & shared & shared[previous]
            rows = np.flatnonzero(candidate)
            if rows.size < 2:
                break
            ids = _dense(key_of_row[rows - 1] * n_states + batch.row_key[rows])
        values, kept = _key_values(returns[rows], ids, normalization)
        if not kept.any():
            break
        key_of_row = np.full(n_rows, -1, dtype=np.int64)
        key_of_row[rows] = ids
        shared = np.zeros(n_rows, dtype=bool)
        shared[rows] = kept
        item = kept & (values != 0.0)
        weight = float(k + 1) ** alpha
        numerator[rows[item]] += weight * values[item]
        denominator[rows[item]] += weight
        if k > 1:
            long_history[rows[item]] = True
    return HistoryAdvantages(
        values=numerator / (denominator + WEIGHT_EPSILON),
        long_history=long_history,
        anchor_size=anchor_size,
    )
