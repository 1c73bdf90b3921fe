"""The distinct-text TF-IDF equals sklearn's TfidfVectorizer(max_features=1024) on every row."""

from __future__ import annotations

import numpy as np
import pytest
from proxmo.core import StepBatch, tfidf, tfidf_features
from proxmo.core.tfidf import MAX_FEATURES, tfidf_matrix
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from .helpers import traj


def _corpus(
    seed: int, n_distinct: int, vocab_size: int, max_mult: int
) -> tuple[list[str], list[str]]:
    """Distinct random documents and a shuffled corpus repeating each 1..max_mult times."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:04d}x" for i in range(vocab_size)] + ["a", "1", "Cabinet", "cabinet"]
    distinct: list[str] = []
    seen: set[str] = set()
    while len(distinct) < n_distinct:
        length = int(rng.integers(0, 25))
        doc = " ".join(rng.choice(words, size=length))
        if doc not in seen:
            seen.add(doc)
            distinct.append(doc)
    multiplicity = rng.integers(1, max_mult + 1, size=n_distinct)
    corpus = [doc for doc, m in zip(distinct, multiplicity, strict=True) for _ in range(int(m))]
    rng.shuffle(corpus)
    return distinct, corpus


def _assert_rows_match(corpus: list[str]) -> None:
    batch = StepBatch.from_trajectories(
        [traj(f"t{i}", "g", [d], [0.0]) for i, d in enumerate(corpus)]
    )
    multiplicity = np.bincount(batch.row_state)
    ours = tfidf_matrix(batch.states, multiplicity)
    vectorizer = TfidfVectorizer(max_features=MAX_FEATURES)
    reference = vectorizer.fit_transform(corpus).toarray()
    assert ours is not None
    assert ours.shape[1] == reference.shape[1] == min(MAX_FEATURES, ours.shape[1])
    np.testing.assert_allclose(ours.toarray()[batch.row_state], reference, rtol=0, atol=1e-15)
    # the re-normalized features PSA uses
    features = tfidf_features(batch)
    assert features is not None
    renormed = reference / (np.linalg.norm(reference, axis=1, keepdims=True) + 1e-8)
    np.testing.assert_allclose(
        features.matrix[features.row_index].toarray(), renormed, rtol=0, atol=1e-15
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_over_1024_terms_with_ties(seed: int) -> None:
    # ~1500 terms, small multiplicities: many terms tie on corpus frequency at the cut-off
    _, corpus = _corpus(seed, n_distinct=400, vocab_size=1500, max_mult=4)
    _assert_rows_match(corpus)


def test_identity_under_1024_terms() -> None:
    _, corpus = _corpus(7, n_distinct=60, vocab_size=200, max_mult=9)
    _assert_rows_match(corpus)


def test_tie_break_is_sklearns_not_alphabetical() -> None:
    # The corpus must make the cut-off land inside a tie, where a stable (alphabetical-first)
    # choice and sklearn's argsort differ; the identity then proves we make sklearn's choice.
    _, corpus = _corpus(0, n_distinct=400, vocab_size=1500, max_mult=4)
    counts = CountVectorizer().fit_transform(corpus)
    term_counts = np.asarray(counts.sum(axis=0)).ravel()
    sklearn_kept = set((-term_counts).argsort()[:MAX_FEATURES].tolist())
    stable_kept = set(np.argsort(-term_counts, kind="stable")[:MAX_FEATURES].tolist())
    assert sklearn_kept != stable_kept
    vectorizer = TfidfVectorizer(max_features=MAX_FEATURES).fit(corpus)
    names = CountVectorizer().fit(corpus).get_feature_names_out()
    assert set(vectorizer.get_feature_names_out()) == {names[i] for i in sklearn_kept}
    _assert_rows_match(corpus)


def test_multiplicity_changes_selection_like_sklearn() -> None:
    # terms that only the repeated documents carry win the cut-off, as in sklearn
    rare = " ".join(f"rare{i:04d}" for i in range(1000))
    frequent = " ".join(f"freq{i:03d}" for i in range(100))
    corpus = [rare] + [frequent] * 5 + ["other words here"] * 3
    _assert_rows_match(corpus)


def test_empty_vocabulary_is_none() -> None:
    batch = StepBatch.from_trajectories([traj("a", "g", ["1 2 3", "", "x y"], [0, 0, 0])])
    assert tfidf_features(batch) is None


def test_row_without_tokens_is_zero() -> None:
    batch = StepBatch.from_trajectories([traj("a", "g", ["the cabinet", "1"], [0, 0])])
    features = tfidf_features(batch)
    assert features is not None
    rows = features.matrix[features.row_index].toarray()
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0, abs=1e-7)
    assert not rows[1].any()


# Texts that exercise the tokenizer's corners: non-ASCII words and case rules (final sigma,
# dotted capital I), digits, underscores, one-character tokens, newlines and control
# characters inside a text, punctuation-only and empty texts.
TOKENIZER_TEXTS = [
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ. Σ σ ς ΑΣ",
    "İstanbul'da İİ ıi Iİ",
    "café Café CAFÉ naïve façade",
    "snake_case __init__ x_ _y a1 1a 42 7",
    "line one\nline two\r\nthird\tcol\x01umn\x0bvert",
    "!!! ... ---",
    "",
    "日本語 テキスト ２０２６ ①② x²",
    "a b c d e f g",
]


@pytest.mark.parametrize("chunk_chars", [1 << 20, 16, 1])
def test_count_terms_equals_countvectorizer(
    chunk_chars: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chunk_chars 16 and 1 split the texts into many chunks, mixing ASCII and non-ASCII ones
    monkeypatch.setattr(tfidf, "_CHUNK_CHARS", chunk_chars)
    counted = tfidf.count_terms(TOKENIZER_TEXTS)
    assert counted is not None
    counts, terms = counted
    vectorizer = CountVectorizer()
    reference = vectorizer.fit_transform(TOKENIZER_TEXTS)
    assert terms == list(vectorizer.get_feature_names_out())
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts.toarray(), reference.toarray())


def test_count_terms_ascii_and_regex_paths_agree() -> None:
    # the same ASCII texts, once through the ASCII path and once forced through the regex
    texts = [t for t in TOKENIZER_TEXTS if t.isascii()]
    ascii_counts, ascii_terms = tfidf.count_terms(texts) or (None, None)
    forced = [*texts, "é"]  # one non-ASCII text sends the whole (single) chunk to the regex
    regex_counts, regex_terms = tfidf.count_terms(forced) or (None, None)
    assert ascii_counts is not None and regex_counts is not None
    assert ascii_terms == regex_terms
    np.testing.assert_array_equal(ascii_counts.toarray(), regex_counts.toarray()[:-1])


def test_count_terms_empty_vocabulary() -> None:
    assert tfidf.count_terms(["a b c", "", "!?", "1 2 3", "é"]) is None
