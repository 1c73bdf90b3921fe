"""TF-IDF state features, exactly scikit-learn's TfidfVectorizer(max_features=1024).

The reference is `TfidfVectorizer(max_features=1024).fit_transform(all step states of the batch)`
(duplicates included), rows then re-normalized x / (|x| + 1e-8). Agent states repeat a lot, so
this fits on the distinct texts with their multiplicities instead, reproducing every quantity
sklearn derives from the full corpus:

- vocabulary: the union of the distinct texts' tokens (same analyzer, alphabetical order);
- max_features selection: corpus term counts tf_w = sum_u c_uw * m_u, then the first 1024 of
  argsort(-tf) over the alphabetical vocabulary (the very call sklearn's _limit_features makes
  on the same int64 array, so ties break identically), kept in alphabetical order;
- idf_w = ln((1 + n) / (1 + df_w)) + 1 with n = number of ROWS and df_w = sum of m_u over
  distinct texts containing w;
- each distinct text's row: counts * idf, L2-normalized (sklearn's `normalize`), which is the
  row sklearn gives every duplicate of that text.

tests/core/test_tfidf.py proves the identity against the real TfidfVectorizer: same vocabulary
and cut-off, values equal to 1e-15 (at most one ulp apart: sklearn's l2 sum may add a row's
terms in another order).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.preprocessing import normalize

from proxmo.core.batch import StepBatch
from proxmo.core.step import StateFeatures

MAX_FEATURES = 1024
RENORM_EPSILON = 1e-8


def tfidf_matrix(
    texts: tuple[str, ...] | list[str], multiplicity: np.ndarray, max_features: int = MAX_FEATURES
) -> sp.csr_matrix | None:
    """TF-IDF rows of distinct `texts`, each occurring `multiplicity[u]` times in the corpus.

    Equal to the rows of TfidfVectorizer(max_features=...).fit_transform(corpus), before the
    extra re-normalization. None when the vocabulary is empty (sklearn raises ValueError).
    """
    counter = CountVectorizer()  # the analyzer TfidfVectorizer uses, library defaults
    try:
        counts = sp.csr_matrix(counter.fit_transform(texts))
    except ValueError:  # empty vocabulary: no document has a token of 2+ word characters
        return None
    mult = np.asarray(multiplicity, dtype=np.int64)
    if counts.shape[1] > max_features:
        term_counts = np.asarray(counts.T @ mult, dtype=np.int64).ravel()
        chosen = (-term_counts).argsort()[:max_features]
        kept = np.zeros(counts.shape[1], dtype=bool)
        kept[chosen] = True
        counts = sp.csr_matrix(counts[:, np.flatnonzero(kept)])
    n_rows = int(mult.sum())
    present = counts.copy()
    present.data = np.ones_like(present.data)
    df = np.asarray(present.T @ mult, dtype=np.float64).ravel()
    idf = np.full_like(df, float(n_rows + 1))
    idf /= df + 1.0
    np.log(idf, out=idf)
    idf += 1.0
    weighted = counts.astype(np.float64)
    weighted.data *= idf[weighted.indices]
    return sp.csr_matrix(normalize(weighted, norm="l2", copy=False))


def tfidf_features(batch: StepBatch) -> StateFeatures | None:
    """TFIDF similarity features of a batch: one row per distinct state text, re-normalized
    x / (|x| + 1e-8); row_index = batch.row_state. None for an empty vocabulary (A^S = 0)."""
    multiplicity = np.bincount(batch.row_state, minlength=len(batch.states))
    matrix = tfidf_matrix(batch.states, multiplicity)
    if matrix is None:
        return None
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1), dtype=np.float64)).ravel()
    scale = 1.0 / (norms + RENORM_EPSILON)
    renormed = sp.csr_matrix(sp.diags(scale) @ matrix)
    return StateFeatures(renormed, batch.row_state)
