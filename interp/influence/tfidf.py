"""TF-IDF candidate filtering: which training sequences are worth scoring for a query.

Scoring every training sequence against every query is the expensive part of influence
search, so Grosse et al. 2023 (section 3.2) first keep, per query, the training sequences
most similar to it by TF-IDF and compute influence on those only. Here terms are token ids:

    tf(t, d) = count of t in d,  idf(t) = ln((1 + N) / (1 + df(t))) + 1
    similarity(q, d) = <tfidf(q) / |tfidf(q)|, tfidf(d) / |tfidf(d)|>

(the conventions of scikit-learn's `TfidfVectorizer` with smooth idf and l2 norm, which the
tests check against). The index is an inverted list in NumPy: memory grows with the number
of (document, distinct token) pairs, not with documents x vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TfidfIndex:
    """TF-IDF vectors of a fixed set of token sequences, searchable by query.

    Args:
      documents: [N, T] int token ids, or a sequence of 1-D int arrays (any lengths).
      ignore: Token ids that are not terms (padding, BOS/EOS).
    """

    def __init__(self, documents: np.ndarray | Sequence[np.ndarray], ignore: Sequence[int] = ()):
        rows = [np.asarray(d).reshape(-1) for d in documents]
        self.num_documents = len(rows)
        if self.num_documents == 0:
            raise ValueError("TfidfIndex needs at least one document.")
        ignore = np.asarray(sorted(set(ignore)), np.int64)
        doc_ids, terms, counts = [], [], []
        for i, row in enumerate(rows):
            row = row[~np.isin(row, ignore)] if ignore.size else row
            unique, count = np.unique(row.astype(np.int64), return_counts=True)
            doc_ids.append(np.full(len(unique), i, np.int64))
            terms.append(unique)
            counts.append(count.astype(np.float64))
        doc_ids, terms, counts = map(np.concatenate, (doc_ids, terms, counts))
        self.ignore = ignore
        self.vocabulary, inverse, document_frequency = np.unique(
            terms, return_inverse=True, return_counts=True
        )
        self.idf = np.log((1.0 + self.num_documents) / (1.0 + document_frequency)) + 1.0
        weights = counts * self.idf[inverse]
        norms = np.sqrt(np.bincount(doc_ids, weights=weights**2, minlength=self.num_documents))
        weights = weights / np.where(norms > 0, norms, 1.0)[doc_ids]
        # Postings sorted by term: for term j, documents[starts[j]:starts[j + 1]].
        order = np.argsort(inverse, kind="stable")
        self._documents = doc_ids[order]
        self._weights = weights[order]
        self._starts = np.concatenate([[0], np.cumsum(document_frequency)])

    def similarities(self, query: np.ndarray) -> np.ndarray:
        """[N] cosine similarity of every document to the query's TF-IDF vector."""
        query = np.asarray(query).reshape(-1).astype(np.int64)
        if self.ignore.size:
            query = query[~np.isin(query, self.ignore)]
        unique, counts = np.unique(query, return_counts=True)
        known = np.searchsorted(self.vocabulary, unique)
        known = np.minimum(known, len(self.vocabulary) - 1)
        present = self.vocabulary[known] == unique
        scores = np.zeros(self.num_documents)
        if not present.any():
            return scores
        columns, counts = known[present], counts[present].astype(np.float64)
        # Terms no document holds are dropped, as scikit-learn's transform does (the query's
        # norm only scales its similarities, never reorders them).
        query_weights = counts * self.idf[columns]
        norm = np.sqrt(np.sum(query_weights**2))
        for column, weight in zip(columns, query_weights / norm, strict=True):
            start, stop = self._starts[column], self._starts[column + 1]
            scores[self._documents[start:stop]] += weight * self._weights[start:stop]
        return scores

    def top_k(self, query: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k most similar documents, most similar first (ties: lower index)."""
        scores = self.similarities(query)
        k = min(k, self.num_documents)
        return np.lexsort((np.arange(len(scores)), -scores))[:k]
