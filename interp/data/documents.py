"""The text a job trains and evaluates on: the built-in corpus or the user's files."""

from __future__ import annotations

from typing import Any

from interp.data import corpus, text


def documents(data_config: Any) -> tuple[list[str], list[str]]:
    """(train, held-out) documents for a job's `config.data`.

    Args:
      data_config: With `text_path` ('' = the built-in Gutenberg corpus, whose last
        `heldout_fraction` of each book is held out; else .txt/.jsonl files, local or gs://,
        whose last `heldout_fraction` of documents is held out) and `max_documents` (0 = all;
        else that many training documents and a tenth as many held out).

    Returns:
      (train documents, held-out documents).
    """
    if data_config.text_path:
        docs = text.read_documents(data_config.text_path, txt_paragraphs=True)
        cut = max(1, int(len(docs) * data_config.heldout_fraction))
        train, heldout = docs[:-cut], docs[-cut:]
    else:
        train = corpus.load_documents("train", heldout_fraction=data_config.heldout_fraction)
        heldout = corpus.load_documents("heldout", heldout_fraction=data_config.heldout_fraction)
    if data_config.max_documents:
        train = train[: data_config.max_documents]
        heldout = heldout[: max(1, data_config.max_documents // 10)]
    return train, heldout
