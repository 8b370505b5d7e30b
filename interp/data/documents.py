"""The text a job trains and evaluates on: the built-in corpus or the user's files.

    train, heldout = documents(config.data)
    rows = pack_rows(config.data, train, tokenizer, needed=4096)   # int32 [N, seq_len]
    rows = sample_rows(config.data, heldout, tokenizer, 256, seed=config.seed)  # spread out

Two kinds of source:

- **In memory** (lists): the built-in Gutenberg corpus and `.txt`/`.jsonl` files, a few MB.
  They are packed whole, and a job draws the rows it needs from all of them (`sample_rows`:
  the documents are in source order, book after book, so the first rows would be the first
  books only).
- **Streamed** (`text.DocumentStream`): Parquet files, Arrow files and Hugging Face `datasets`
  folders, any size (a Pile or FineWeb shard is many GB). They are read lazily, row group by
  row group, and packed only as far as a job's first `needed` rows: a job that needs 4096 rows
  of 128 tokens reads about 0.5M tokens of text, whatever the corpus's size. Files are read in
  order, so those rows are the corpus's first; shuffle or pick the shards accordingly.

The held-out split of a streamed source is by document and deterministic: a document is held
out iff the first 8 bytes of the blake2b hash of its UTF-8 text, read as a number in [0, 1), are
below `heldout_fraction`. It needs no document count, does not depend on file order, sharding,
or how far a stream is read, and identical texts always fall on the same side (an exact
duplicate is never in both splits). Each split's stream reads the corpus from its start and
skips the other split's documents.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from interp.data import corpus, text

# config.data.prepend_bos -> `text.pack(add_bos=...)`.
PREPEND_BOS = {"tokenizer": None, "always": True, "never": False}


def documents(data_config: Any) -> tuple[Sequence[str] | text.DocumentStream, ...]:
    """(train, held-out) documents for a job's `config.data`.

    Args:
      data_config: With `text_path` ('' = the built-in Gutenberg corpus, whose last
        `heldout_fraction` of each book is held out; .txt/.jsonl files, local or gs://, whose
        last `heldout_fraction` of documents is held out; .parquet/.arrow files or a
        `save_to_disk` folder, local or gs://, streamed, held out by hash as the module
        docstring says), `heldout_fraction`, and `max_documents` (0 = all; else that many
        training documents and a tenth as many held out). Optional fields: `text_field`
        (default 'text': the JSON field / column with the text), `split` (default '': a
        DatasetDict folder's split, '' = 'train') and `prepend_bos` (checked here, used by
        `pack_rows`).

    Returns:
      (train documents, held-out documents): two lists, or two `text.DocumentStream`s for a
      streamed source.

    Raises:
      ValueError: An unknown `prepend_bos`, a streamed source with `heldout_fraction` not in
        (0, 1), a path mixing text and columnar files, or a problem `text.resolve` reports.
      FileNotFoundError: Nothing at `text_path`.
    """
    bos_option(data_config)  # An unknown value fails before any reading.
    path = data_config.text_path
    text_field = data_config.get("text_field", "text")
    split = data_config.get("split", "")
    files = text.resolve(path, split=split) if path else []
    kinds = {kind for _, kind in files}
    if kinds & set(text.COLUMNAR_KINDS):
        if kinds - set(text.COLUMNAR_KINDS):
            raise ValueError(
                f"config.data.text_path={path!r} mixes text files ({sorted(kinds)}) with "
                f"Parquet/Arrow files; point it at one kind (a glob such as '*.parquet')."
            )
        return _streams(data_config, path, files, text_field)
    if path:
        docs = list(text.iter_files(files, txt_paragraphs=True, text_field=text_field))
        cut = max(1, int(len(docs) * data_config.heldout_fraction))
        train, heldout = docs[:-cut], docs[-cut:]
    else:
        train = corpus.load_documents("train", heldout_fraction=data_config.heldout_fraction)
        heldout = corpus.load_documents("heldout", heldout_fraction=data_config.heldout_fraction)
    if data_config.max_documents:
        train = train[: data_config.max_documents]
        heldout = heldout[: max(1, data_config.max_documents // 10)]
    return train, heldout


def is_heldout(document: str, heldout_fraction: float) -> bool:
    """Whether a streamed source holds `document` out (see the module docstring)."""
    digest = hashlib.blake2b(document.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < heldout_fraction * 2**64


def bos_option(data_config: Any) -> bool | None:
    """`text.pack`'s `add_bos` for `config.data.prepend_bos`.

    'tokenizer' (the default when the field is absent): the tokenizer's own convention, what
    its checkpoint's post-processor puts before a text (Llama's and Gemma's bos; nothing for
    GPT-2). 'always': a bos token before every document (as TransformerLens and SAELens
    `prepend_bos=True` do for GPT-2); the tokenizer must have one. 'never': no special token
    before a document.

    Raises:
      ValueError: Another value.
    """
    value = data_config.get("prepend_bos", "tokenizer")
    if value not in PREPEND_BOS:
        raise ValueError(
            f"config.data.prepend_bos must be one of {sorted(PREPEND_BOS)}, got {value!r}."
        )
    return PREPEND_BOS[value]


def separator_option(data_config: Any) -> str | None:
    """`text.pack`'s `separator` for `config.data.separator`: 'eos' (the default when the
    field is absent), 'none' (nothing between documents) or a token string."""
    value = data_config.get("separator", "eos") if hasattr(data_config, "get") else "eos"
    if not isinstance(value, str) or not value:
        raise ValueError(f"config.data.separator={value!r}: give 'eos', 'none' or a token string.")
    return None if value == "none" else value


def pack_rows(
    data_config: Any, docs: Iterable[str], tokenizer: text.Encoder, needed: int
) -> np.ndarray:
    """The packed rows a job draws `needed` rows from: `text.pack` with `config.data`'s settings.

    A list of documents (an in-memory source) is packed whole, so a job's random draw is over
    all of its rows; a stream is packed only as far as its first `needed` rows and the rest of
    the corpus is never read. Either way the first rows are the same for the same documents.

    Args:
      data_config: `config.data`: `seq_len`, and `prepend_bos` if present.
      docs: From `documents`.
      tokenizer: As for `text.pack`.
      needed: Rows the job uses at most, >= 0.

    Returns:
      int32 [N, seq_len]; N <= `needed` for a stream; N >= 1 when `needed` >= 1.

    Raises:
      ValueError: As `text.pack` raises (e.g. prepend_bos='always' and no bos token), or
        `needed` >= 1 and the documents give no whole row (none at all, every value null or
        blank, or fewer than `seq_len` tokens in all): a job would otherwise fail later on
        an empty array with no word on the text.
    """
    max_rows = None if isinstance(docs, Sequence) else needed
    rows = text.pack(
        docs,
        tokenizer,
        data_config.seq_len,
        add_bos=bos_option(data_config),
        max_rows=max_rows,
        separator=separator_option(data_config),
    )
    if needed >= 1 and not len(rows):
        what = docs.description if isinstance(docs, text.DocumentStream) else (
            f"{len(docs)} documents"
        )  # fmt: skip
        raise ValueError(
            f"No row of {data_config.seq_len} tokens from {what}: the text (non-blank values "
            f"of its {data_config.get('text_field', 'text')!r} field) holds fewer tokens than "
            "that, or none. Check config.data.text_path, text_field and split, or lower "
            "config.data.seq_len."
        )
    return rows


def sample_indices(num_rows: int, count: int, seed: int) -> np.ndarray:
    """Indices of `count` of `num_rows` rows drawn by a seeded permutation, in increasing order
    (all rows when `count` >= `num_rows`): int64 [min(count, num_rows)].

    The first `count` of `default_rng(seed).permutation(num_rows)`, so a larger `count` with
    the same seed keeps every row a smaller one drew.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    if count >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:count])


def sample_rows(
    data_config: Any, docs: Iterable[str], tokenizer: text.Encoder, count: int, seed: int
) -> np.ndarray:
    """`count` packed rows that represent `docs`: what a job's statistics are taken over.

    Documents come in source order (the built-in corpus book after book; files in path
    order), so the first `count` rows are the first books only: a concept of the last book
    is never seen, and maxima and densities describe part of the text. An in-memory source
    is packed whole and `count` of its rows are drawn by a seeded permutation
    (`sample_indices`), kept in source order; all of them when it has no more. A stream
    (`text.DocumentStream`, any size) is read only as far as its first `count` rows, as
    `pack_rows` does: its documents are spread over the corpus only as far as the files are
    (a streamed held-out split is by hash, so it holds documents of every file read).

    Args:
      data_config: `config.data`, as for `pack_rows`.
      docs: From `documents`.
      tokenizer: As for `text.pack`.
      count: Rows wanted, >= 1.
      seed: Seed of the draw (a job's `config.seed`: jobs with the same seed and source
        take the same rows, so the analysis and steering stages share their maxima).

    Returns:
      int32 [min(count, N), seq_len], in source order.

    Raises:
      ValueError: As `pack_rows` raises.
    """
    rows = pack_rows(data_config, docs, tokenizer, count)
    return rows[sample_indices(len(rows), count, seed)]


def _streams(data_config, path, files, text_field) -> tuple[text.DocumentStream, ...]:
    """Lazy train and held-out streams over columnar `files`."""
    fraction = data_config.heldout_fraction
    if not 0 < fraction < 1:
        raise ValueError(
            f"config.data.heldout_fraction must be in (0, 1) for a streamed source "
            f"({path}), got {fraction}: the held-out stream would never find a document."
        )
    limit = data_config.max_documents

    def stream(heldout: bool, count: int) -> text.DocumentStream:
        def make_iterator():
            docs = text.iter_files(files, text_field=text_field)
            chosen = (d for d in docs if is_heldout(d, fraction) == heldout)
            return itertools.islice(chosen, count or None)

        name = "held-out" if heldout else "train"
        return text.DocumentStream(make_iterator, f"{name} documents of {path}")

    return stream(False, limit), stream(True, max(1, limit // 10) if limit else 0)
