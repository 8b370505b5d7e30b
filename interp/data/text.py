"""Text for language-model training: read documents, pack them into rows, batch them.

    documents = text.read_documents('gs://bucket/corpus/*.jsonl')   # or a local folder
    rows = text.pack(documents, tokenizer, seq_len=256)               # int32 [N, 256]
    stream = text.iter_documents('gs://bucket/fineweb/*.parquet')     # lazily, any size
    rows = text.pack(stream, tokenizer, seq_len=256, max_rows=4096)   # reads only what it needs
    batches = text.Batches(rows, batch_size=32, seed=0)
    batch = batches.get(step)                                         # int32 [32, 256]

`Batches.get(step)` is a pure function of (rows, batch_size, seed, step), so a run resumed
at step k sees exactly the batches an uninterrupted run would have seen.
"""

import glob
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import fsspec
import numpy as np

from interp import paths
from interp.data import columnar

# File kinds `read_documents` understands: text files, optionally compressed (fsspec infers
# it), and columnar files (compressed inside).
_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl",)
_COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst")
_COLUMNAR_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
# Kinds read lazily whatever the consumer does: `documents.documents` streams these.
COLUMNAR_KINDS = ("parquet", "arrow")
FORMATS = (
    ".txt, .jsonl (optionally .gz, .bz2, .xz, .zst), .parquet, .arrow, or a folder written by "
    "Hugging Face datasets' save_to_disk"
)


class Encoder(Protocol):
    """What `pack` needs of a tokenizer (`interp.models.tokenizer.Tokenizer` has it)."""

    eos_id: int | None

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]: ...


def split_paragraphs(text: str) -> list[str]:
    """Splits text at blank lines; collapses each paragraph's whitespace to single spaces.

    Args:
        text: Any text; lines may end in '\\n', '\\r\\n' or '\\r'.

    Returns:
        The non-empty paragraphs, in order, each without leading or trailing whitespace.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [paragraph for paragraph in paragraphs if paragraph]


def read_documents(
    path: str | os.PathLike,
    *,
    txt_paragraphs: bool = False,
    text_field: str = "text",
    encoding: str = "utf-8",
    split: str = "",
) -> list[str]:
    """Reads all documents of `path` into a list: `list(iter_documents(...))`.

    Args and Raises as for `iter_documents`.

    Returns:
        The documents, in file order then line/paragraph/row order.
    """
    return list(
        iter_documents(
            path,
            txt_paragraphs=txt_paragraphs,
            text_field=text_field,
            encoding=encoding,
            split=split,
        )
    )


def iter_documents(
    path: str | os.PathLike,
    *,
    txt_paragraphs: bool = False,
    text_field: str = "text",
    encoding: str = "utf-8",
    split: str = "",
) -> Iterator[str]:
    """Yields documents from text and columnar files, local or on any fsspec filesystem.

    `path` may be one file, a folder (every readable file below it, recursively), a glob
    (`gs://bucket/shard-*.parquet`), or a folder written by Hugging Face datasets'
    `save_to_disk`. Files are read in sorted path order (a `save_to_disk` folder in its own
    shard order), so the result is deterministic. The files are found when this is called;
    they are opened one after the other as the iterator is consumed, and an iterator that is
    not consumed to the end never reads the rest.

    - `.txt`: by default the whole file is one document (its text unchanged): that suits a
      folder of articles or books, and keeps a long text's paragraphs in one stream. With
      `txt_paragraphs=True` every blank-line-separated paragraph is a document, whitespace
      collapsed (`split_paragraphs`), as `interp.data.corpus` does. Compressed files
      (`.txt.gz`, `.jsonl.zst`, ...) are decompressed on the fly.
    - `.jsonl`: one JSON object per line; its `text_field` string is a document. Blank lines
      are skipped.
    - `.parquet`: the `text_field` column, one row group at a time (`columnar.read_parquet`).
    - `.arrow` and `save_to_disk` folders (Dataset, or DatasetDict with `split`): the
      `text_field` column, one record batch at a time (`columnar.read_arrow`).

    Empty (all-whitespace) documents and null values are dropped.

    Args:
        path: A file, folder or glob; local, or a URL such as `gs://...` (via fsspec/gcsfs).
        txt_paragraphs: Split `.txt` files into paragraphs instead of one document per file.
        text_field: The JSON field / column that holds the text.
        encoding: Text encoding of `.txt`/`.jsonl` files.
        split: The split of a DatasetDict folder ('' = 'train'); '' for everything else.

    Yields:
        The documents, in file order then line/paragraph/row order.

    Raises:
        FileNotFoundError: Nothing matches `path`, or a folder or glob holds no readable file.
        ValueError: A file has an unknown suffix (the message lists the formats), a JSON line
            is not an object with a string `text_field`, a columnar file has no string column
            `text_field` (the message lists its columns), or `split` is not in the dataset.
            Raised on the first `next()` for problems inside a file.
    """
    files = resolve(path, split=split)
    return iter_files(
        files, txt_paragraphs=txt_paragraphs, text_field=text_field, encoding=encoding
    )


def resolve(path: str | os.PathLike, *, split: str = "") -> list[tuple[str, str]]:
    """The files that `path` names, with their kinds, in reading order.

    Args:
        path: As for `iter_documents`.
        split: As for `iter_documents`.

    Returns:
        [(url, kind)], kind one of 'txt', 'jsonl', 'parquet', 'arrow'.

    Raises:
        FileNotFoundError: Nothing matches `path`, or a folder or glob holds no readable file.
        ValueError: A matched file has an unknown suffix (the message lists the formats), or
            `split` is set for something that is not a DatasetDict folder.
    """
    path = os.fspath(path)
    if columnar.is_hf_dataset(path):
        return [(url, "arrow") for url in columnar.hf_dataset_files(path, split)]
    if split:
        raise ValueError(
            f"split={split!r} (config.data.split) selects a split of a DatasetDict folder, but "
            f"{path} is not one; set it to ''."
        )
    files = []
    for url in _resolve(path):
        kind = _kind(url)
        if kind is None:
            raise ValueError(f"Do not know how to read {url}: expected {FORMATS}.")
        files.append((url, kind))
    return files


def iter_files(
    files: Iterable[tuple[str, str]],
    *,
    txt_paragraphs: bool = False,
    text_field: str = "text",
    encoding: str = "utf-8",
) -> Iterator[str]:
    """Yields the non-empty documents of `files` (from `resolve`), opening one at a time.

    Args and Raises as for `iter_documents`.
    """
    for url, kind in files:
        if kind == "parquet":
            documents = columnar.read_parquet(url, text_field)
        elif kind == "arrow":
            documents = columnar.read_arrow(url, text_field)
        else:
            with fsspec.open(url, "rt", encoding=encoding, compression="infer") as f:
                if kind == "txt":
                    content = f.read()
                    documents = split_paragraphs(content) if txt_paragraphs else [content]
                else:
                    documents = list(_read_jsonl(f, url, text_field))
        yield from (document for document in documents if document.strip())


class DocumentStream(Iterable[str]):
    """Documents that are read afresh, lazily, each time they are iterated.

    What `interp.data.documents.documents` returns for sources too large to hold in memory
    (Parquet, Arrow, `datasets` folders): iterate it as often as needed (a tokenizer trained on
    it, then packing), each pass reading only as far as it is consumed. A `list` of documents
    is the in-memory counterpart; `isinstance(docs, Sequence)` tells them apart.
    """

    def __init__(self, make_iterator: Callable[[], Iterator[str]], description: str):
        """Wraps a function that starts a new pass over the documents.

        Args:
            make_iterator: Returns a fresh iterator over the documents on each call.
            description: What the documents are, for logs and errors.
        """
        self._make_iterator = make_iterator
        self.description = description

    def __iter__(self) -> Iterator[str]:
        return self._make_iterator()

    def __repr__(self) -> str:
        return f"DocumentStream({self.description})"


def pack(
    documents: Iterable[str],
    tokenizer: Encoder,
    seq_len: int,
    *,
    add_bos: bool | None = None,
    max_rows: int | None = None,
    separator: str | None = "eos",
) -> np.ndarray:
    """Tokenizes documents into one stream and cuts it into rows for LM training.

    Each document is encoded as the tokenizer encodes a text by default, so with the special
    tokens the checkpoint puts around a text (Llama's and Gemma's bos first; none for GPT-2
    style tokenizers). A separator token (the eos by default) goes between documents (not after
    the last one), unless one is there already: a document that ends with it (a template adding
    it) or the next that starts with it (a bos that is also the eos, as in GPT-2) needs no
    second one. Rows are
    consecutive `seq_len`-token slices of the stream; the ragged tail shorter than `seq_len` is
    dropped, and a row may start inside a document. Special-token strings inside a document
    are tokenized as the tokenizer does (byte-level BPE from `interp.models.tokenizer` maps a
    literal '<|endoftext|>' to the special token, like Hugging Face).

    Documents are taken from `documents` as they are needed and tokenized a few at a time, and
    rows are cut as the stream grows, so memory holds the rows and one batch of documents; with
    `max_rows`, documents after the ones that fill the first `max_rows` rows are never read
    (the first `max_rows` rows of the whole result, bit for bit).

    Args:
        documents: The texts; any iterable (a list, or a lazy `DocumentStream`).
        tokenizer: Has `encode_many(texts) -> list[list[int]]` and `eos_id` (not None), such
            as `interp.models.tokenizer.Tokenizer`.
        seq_len: Tokens per row, >= 1.
        add_bos: None: the tokenizer's convention. True: a bos at each document's start
            (the tokenizer must have a `bos_id`). False: no special token before a document.
            Passed to `encode_many(texts, add_bos=...)`.
        max_rows: Stop after this many rows (>= 0); None: all the documents.
        separator: 'eos': the tokenizer's eos token; None: nothing between documents; else a
            token string of the tokenizer (e.g. '<|endoftext|>' for a chat model, whose eos is
            the end of a turn).

    Returns:
        int32 [N, seq_len], N = floor(stream length / seq_len), at most `max_rows`; N may be 0.

    Raises:
        ValueError: `seq_len` < 1, `max_rows` < 0, separator 'eos' and the tokenizer has no
            eos_id, a separator string that is not one token, or add_bos=True and it has no
            bos_id.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}.")
    eos_id = separator_id(tokenizer, separator)
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        raise ValueError(
            "A bos token was asked for at each document's start (add_bos=True, "
            "config.data.prepend_bos='always'), but the tokenizer has no bos token. Use "
            "prepend_bos='tokenizer' (its own convention) or 'never', or load the tokenizer "
            "with bos_token= (tokenizer_config.json 'bos_token')."
        )
    eos = np.asarray([0 if eos_id is None else eos_id], np.int32)
    options = {} if add_bos is None else {"add_bos": add_bos}
    rows: list[np.ndarray] = []  # Blocks of finished rows, [n, seq_len] each.
    num_rows = 0
    pending: list[np.ndarray] = []  # Stream tokens not yet cut into rows.
    num_pending = 0
    first, last = True, None  # `last`: the stream's last token so far.
    for chunk in _chunks(documents, _CHUNK_SIZES):  # Batched: the Rust tokenizer parallelises.
        for ids in tokenizer.encode_many(chunk, **options):
            if eos_id is None:  # No separator.
                pass
            elif not first and last != eos_id and not (ids and ids[0] == eos_id):
                pending.append(eos)
                num_pending += 1
                last = eos_id
            pending.append(np.asarray(ids, np.int32))
            num_pending += len(ids)
            first, last = False, ids[-1] if ids else last
        if num_pending >= seq_len:
            stream = np.concatenate(pending)
            whole = len(stream) // seq_len
            rows.append(stream[: whole * seq_len].reshape(whole, seq_len))
            pending, num_pending, num_rows = (
                [stream[whole * seq_len :]],
                len(stream) % seq_len,
                num_rows + whole,
            )
        if max_rows is not None and num_rows >= max_rows:
            break
    packed = np.concatenate(rows) if rows else np.zeros((0, seq_len), np.int32)
    return packed if max_rows is None else packed[:max_rows]


def separator_id(tokenizer: Encoder, separator: str | None) -> int | None:
    """The token id `pack` puts between documents (None: nothing)."""
    if separator is None:
        return None
    if separator == "eos":
        if tokenizer.eos_id is None:
            raise ValueError(
                "pack separates documents with the eos token, but the tokenizer has no eos_id. "
                "Load one with an eos token (tokenizer_config.json 'eos_token'), pass "
                "eos_token= to Tokenizer.from_file / train_bpe, or choose another separator "
                "(config.data.separator: a token string, or 'none')."
            )
        return tokenizer.eos_id
    ids = tokenizer.encode_many([separator], add_bos=False, add_eos=False)[0]
    if len(ids) != 1:
        raise ValueError(
            f"The document separator {separator!r} is {len(ids)} tokens of this tokenizer, "
            "not one; use one of its special tokens (e.g. its eos), 'eos' or 'none'."
        )
    return int(ids[0])


class Batches:
    """Deterministic shuffled batches over packed rows, resumable at any step.

    Step s belongs to epoch e = s // steps_per_epoch. Each epoch visits the rows in a fresh
    permutation drawn from (seed, e) and serves them `batch_size` at a time; the last
    `num_rows % batch_size` rows of each epoch's permutation are skipped, so every batch is
    full and every epoch has the same number of steps. `get(step)` depends on nothing but
    (rows, batch_size, seed, step): resuming at step k gives exactly the batches an
    uninterrupted run gets from step k on.

    The permutation comes from NumPy's `default_rng([seed, epoch])`, whose streams NumPy keeps
    stable in practice but does not promise across major versions: resume with the NumPy
    you started with if bit-exact batches matter.

    Attributes:
        tokens: The packed rows [N, T] (any array-like indexable by an int array, e.g. a
            `np.memmap`, which then reads only the rows asked for).
        batch_size: Rows per batch B.
        seed: Seed of the epoch permutations.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seed: int = 0):
        """Wraps the rows.

        Args:
            tokens: [N, T] packed rows, e.g. from `pack`.
            batch_size: Rows per batch, 1 <= batch_size <= N.
            seed: Non-negative seed of the epoch permutations.
        """
        if np.ndim(tokens) != 2:
            raise ValueError(f"tokens must be [N, T], got shape {np.shape(tokens)}.")
        if not 1 <= batch_size <= len(tokens):
            raise ValueError(
                f"batch_size must be in [1, {len(tokens)}] (the number of rows), got "
                f"{batch_size}. Pack more text or use a smaller batch."
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._permutation = None, None  # The last epoch's permutation.

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per pass over the rows."""
        return len(self.tokens) // self.batch_size

    def indices(self, step: int) -> np.ndarray:
        """Returns the row indices of batch `step`: int64 [B]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._permutation = epoch, rng.permutation(len(self.tokens))
        return self._permutation[index * self.batch_size : (index + 1) * self.batch_size]

    def get(self, step: int) -> np.ndarray:
        """Returns batch `step`: [B, T], the dtype of `tokens`."""
        return np.asarray(self.tokens[self.indices(step)])

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Yields `get(start_step)`, `get(start_step + 1)`, ... forever."""
        step = start_step
        while True:
            yield self.get(step)
            step += 1


def _resolve(path: str) -> list[str]:
    """The sorted file URLs that `path` (file, folder or glob) names."""
    fs, root = fsspec.core.url_to_fs(path)
    if glob.has_magic(root):
        found = [p for p in fs.glob(root) if fs.isfile(p)]
        what = f"No file matches the glob {path}"
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if _kind(p) is not None]
        what = f"The folder {path} holds no readable file ({FORMATS})"
    elif fs.isfile(root):
        return [path]
    else:
        raise FileNotFoundError(f"No such file or folder: {path}")
    if not found:
        raise FileNotFoundError(f"{what}; check the path.")
    return [fs.unstrip_protocol(p) if paths.is_remote(path) else p for p in sorted(found)]


def _kind(path: str) -> str | None:
    """'txt', 'jsonl', 'parquet', 'arrow' or None, from the suffix (text may be compressed)."""
    for suffix, kind in _COLUMNAR_SUFFIXES.items():
        if path.endswith(suffix):
            return kind
    for compression in _COMPRESSION_SUFFIXES:
        for suffixes, kind in ((_TEXT_SUFFIXES, "txt"), (_JSONL_SUFFIXES, "jsonl")):
            if any(path.endswith(suffix + compression) for suffix in suffixes):
                return kind
    return None


def _read_jsonl(lines: Iterable[str], url: str, text_field: str) -> Iterator[str]:
    """The `text_field` of each non-blank JSON line."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url}:{line_number} is not valid JSON ({e}).") from e
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise ValueError(
                f"{url}:{line_number} has no string field {text_field!r}; pass "
                f"text_field= to name the field that holds the text."
            )
        yield value


# Documents tokenized per `encode_many` call: few at first, so a pack that needs only a few
# rows reads only a few documents past them; then 1024, for the tokenizer's parallelism.
_CHUNK_SIZES = (8, 32, 128, 512, 1024)


def _chunks(items: Iterable[str], sizes: Sequence[int]) -> Iterator[list[str]]:
    """Consecutive lists of items, of sizes[0], sizes[1], ..., then sizes[-1] each."""
    iterator = iter(items)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, sizes[min(index, len(sizes) - 1)]))
        if not chunk:
            return
        yield chunk
