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
- each distinct text's row: counts * idf, L2-normalized as sklearn's `normalize` does (a
  row's squares summed in entry order, zero rows kept), which is the row sklearn gives every
  duplicate of that text.

The term counts are CountVectorizer's (lowercased texts, tokens = runs of two or more word
characters as its default token pattern finds them, terms in alphabetical order) computed
without its per-token Python loop: a chunk of texts is joined by newlines and tokenized in one
pass (bytes.translate + str.split for ASCII, the regex otherwise), then counted with numpy and
scipy, about 5x faster on agent observations.

tests/core/test_tfidf.py proves the identity against the real TfidfVectorizer: same vocabulary
and cut-off, values equal to 1e-15 (at most one ulp apart: sklearn's l2 sum may add a row's
terms in another order).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from proxmo.core.batch import StepBatch
from proxmo.core.step import StateFeatures

MAX_FEATURES = 1024
RENORM_EPSILON = 1e-8
# A token as CountVectorizer's default pattern `(?u)\b\w\w+\b` finds it, or the newline that
# ends a text in a joined chunk (no word character, so no token spans two texts). Scanning left
# to right, a greedy `\w\w+` can only start at the first character of a run of word characters
# and ends at its last, so the \b are implied (and cost half the regex time).
_TOKEN_OR_END = re.compile(r"\w\w+|\n")
# ASCII text, where \w is exactly [A-Za-z0-9_]: word bytes stay, the newline becomes \x01 (an
# end marker that str.split keeps), every other byte a space.
_WORD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_ASCII_SPACES = bytes(c if c in _WORD_BYTES else 1 if c == 10 else 32 for c in range(256))
_END_MARKERS = ("\n", "\x01")
# Characters tokenized in one pass: bounds the token strings held at once.
_CHUNK_CHARS = 1 << 20


def _chunks(texts: Sequence[str]) -> Iterator[Sequence[str]]:
    """Consecutive runs of `texts` of about _CHUNK_CHARS characters (at least one text)."""
    ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
    # a chunk ends with the text that reaches the next multiple of _CHUNK_CHARS
    cuts = np.searchsorted(ends, np.arange(_CHUNK_CHARS, int(ends[-1]), _CHUNK_CHARS)) + 1
    bounds = [0, *np.unique(cuts[cuts < len(texts)]).tolist(), len(texts)]
    for start, stop in itertools.pairwise(bounds):
        yield texts[start:stop]


def _tokens(joined: str) -> list[str]:
    """Lowercased tokens of texts joined by newlines (none inside a text), in order, each
    text's followed by an end marker (_END_MARKERS); one-character tokens may be among them.

    ASCII text (agent observations, mostly) takes bytes.translate and str.split, three times
    faster than the regex: both give the maximal runs of word characters.
    """
    if joined.isascii():
        spaced = joined.encode("ascii").translate(_ASCII_SPACES).lower().decode("ascii")
        return spaced.replace("\x01", " \x01 ").split()
    return _TOKEN_OR_END.findall(joined.lower())


class _TermIds(dict[str, int]):
    """Term -> id in order of first sight; end markers -1, one-character tokens -2 (dropped).
    A new token costs one __missing__ call, a known one a C-level dict lookup."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(_END_MARKERS, -1))
        self.n_terms = 0

    def __missing__(self, token: str) -> int:
        if len(token) < 2:
            index = -2
        else:
            index, self.n_terms = self.n_terms, self.n_terms + 1
        self[token] = index
        return index


def count_terms(texts: Sequence[str]) -> tuple[sp.csr_matrix, list[str]] | None:
    """CountVectorizer().fit_transform(texts) and its terms in column order (alphabetical);
    None for an empty vocabulary (where sklearn raises ValueError).

    Per chunk, the texts are joined by newlines (a newline inside a text becomes a space: both
    are non-word characters, so the tokens are unchanged) and lowercased together, which
    lowercases each text exactly as alone (a newline is neither cased nor case-ignorable, so
    even the final-sigma rule cannot see across it). The document of a token is the number of
    end markers before it.
    """
    if not texts:
        return None
    ids_of = _TermIds()
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    first_doc = 0
    for chunk in _chunks(texts):
        joined = "\n".join(chunk)
        if joined.count("\n") != len(chunk) - 1:
            joined = "\n".join(text.replace("\n", " ") for text in chunk)
        tokens = _tokens(joined)
        ids = np.fromiter(map(ids_of.__getitem__, tokens), dtype=np.int64, count=len(tokens))
        kept = ids >= 0
        docs = np.cumsum(ids == -1)[kept]
        # (document, term) pairs with their counts: a COO -> CSR conversion sums duplicates
        piece = (
            sp.coo_matrix(
                (np.ones(docs.shape[0], dtype=np.int64), (docs, ids[kept])),
                shape=(len(chunk), max(ids_of.n_terms, 1)),
            )
            .tocsr()
            .tocoo()
        )
        rows.append(piece.row + first_doc)
        cols.append(piece.col)
        counts.append(piece.data)
        first_doc += len(chunk)
    if ids_of.n_terms == 0:
        return None
    terms = sorted(term for term, index in ids_of.items() if index >= 0)
    column_of = np.empty(ids_of.n_terms, dtype=np.int64)
    column_of[[ids_of[term] for term in terms]] = np.arange(ids_of.n_terms)
    matrix = sp.csr_matrix(
        (np.concatenate(counts), (np.concatenate(rows), column_of[np.concatenate(cols)])),
        shape=(len(texts), ids_of.n_terms),
        dtype=np.int64,
    )
    matrix.sum_duplicates()
    return matrix, terms


def tfidf_matrix(
    texts: tuple[str, ...] | list[str], multiplicity: np.ndarray, max_features: int = MAX_FEATURES
) -> sp.csr_matrix | None:
    """TF-IDF rows of distinct `texts`, each occurring `multiplicity[u]` times in the corpus.

    Equal to the rows of TfidfVectorizer(max_features=...).fit_transform(corpus), before the
    extra re-normalization. None when the vocabulary is empty (sklearn raises ValueError).
    """
    fitted = count_terms(texts)
    if fitted is None:  # empty vocabulary: no document has a token of 2+ word characters
        return None
    counts = fitted[0]
    mult = np.asarray(multiplicity, dtype=np.int64)
    if counts.shape[1] > max_features:
        term_counts = np.asarray(counts.T @ mult, dtype=np.int64).ravel()
        chosen = (-term_counts).argsort()[:max_features]
        kept = np.zeros(counts.shape[1], dtype=bool)
        kept[chosen] = True
        counts = sp.csr_matrix(counts[:, np.flatnonzero(kept)])
    row_of_entry = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    # df_w = rows containing w = sum of the multiplicities of the texts containing it
    df = np.bincount(counts.indices, weights=mult[row_of_entry], minlength=counts.shape[1])
    idf = np.full(df.shape, float(mult.sum() + 1))
    idf /= df + 1.0
    np.log(idf, out=idf)
    idf += 1.0
    weighted = counts.data * idf[counts.indices]
    # sklearn's normalize(norm="l2"): each row's squares summed in entry order, zero rows kept
    norms = np.sqrt(
        np.bincount(row_of_entry, weights=weighted * weighted, minlength=counts.shape[0])
    )
    weighted /= np.where(norms > 0.0, norms, 1.0)[row_of_entry]
    return sp.csr_matrix((weighted, counts.indices, counts.indptr), shape=counts.shape)


def tfidf_features(batch: StepBatch) -> StateFeatures | None:
    """TFIDF similarity features of a batch: one row per distinct state text, re-normalized
    x / (|x| + 1e-8); row_index = batch.row_state. None for an empty vocabulary (A^S = 0)."""
    multiplicity = np.bincount(batch.row_state, minlength=len(batch.states))
    matrix = tfidf_matrix(batch.states, multiplicity)
    if matrix is None:
        return None
    row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    norms = np.sqrt(
        np.bincount(row_of_entry, weights=matrix.data * matrix.data, minlength=matrix.shape[0])
    )
    scale = 1.0 / (norms + RENORM_EPSILON)
    renormed = sp.csr_matrix(
        (matrix.data * scale[row_of_entry], matrix.indices, matrix.indptr), shape=matrix.shape
    )
    return StateFeatures(renormed, batch.row_state)
