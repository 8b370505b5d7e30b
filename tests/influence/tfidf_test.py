"""TF-IDF candidate filtering against scikit-learn's TfidfVectorizer on token ids."""

import numpy as np
import pytest

from interp.influence.tfidf import TfidfIndex
from tests import references

sklearn_text = references.require_module(
    "sklearn.feature_extraction.text", "pip install -e '.[test]' (scikit-learn)"
)


def _reference(documents, queries, ignore=()):
    vectorizer = sklearn_text.TfidfVectorizer(
        analyzer=lambda row: [str(t) for t in row if t not in ignore], lowercase=False
    )
    matrix = vectorizer.fit_transform([list(d) for d in documents])
    return (vectorizer.transform([list(q) for q in queries]) @ matrix.T).toarray()


@pytest.mark.parametrize("ignore", [(), (0,)])
def test_similarities_equal_scikit_learn(ignore):
    rng = np.random.default_rng(0)
    # Zipf-like token frequencies, ragged lengths, and a query token no document holds.
    documents = [rng.zipf(1.5, size=rng.integers(5, 40)) % 50 for _ in range(30)]
    queries = [rng.zipf(1.5, size=12) % 50 for _ in range(4)] + [np.array([7, 7, 999])]
    index = TfidfIndex(documents, ignore=ignore)
    want = _reference(documents, queries, ignore)
    got = np.stack([index.similarities(q) for q in queries])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_top_k_prefers_shared_rare_tokens_and_ignores_ubiquitous_ones():
    common = 1
    documents = np.array([[common, 2, 3, 4], [common, 5, 6, 7], [common, 8, 9, 5],
                          [common, common, common, 2]])  # fmt: skip
    index = TfidfIndex(documents)
    assert index.top_k(np.array([6, 7]), 2).tolist()[0] == 1
    assert index.top_k(np.array([5]), 2).tolist() == [1, 2]  # Tie broken by index.
    assert np.all(index.similarities(np.array([common])) > 0)
    assert index.similarities(np.array([100, 101])).tolist() == [0.0] * 4  # Unknown tokens.
    assert len(index.top_k(np.array([2]), 10)) == 4
    with pytest.raises(ValueError, match="at least one document"):
        TfidfIndex([])
