"""Text for language-model training: read documents, pack them into rows, batch them.

    documents = text.read_documents('gs://bucket/corpus/*.jsonl')   # or a local folder
    rows = text.pack(documents, tokenizer, seq_len=256)               # int32 [N, 256]
    batches = text.Batches(rows, batch_size=32, seed=0)
    batch = batches.get(step)                                         # int32 [32, 256]

`Batches.get(step)` is a pure function of (rows, batch_size, seed, step), so a run resumed
at step k sees exactly the batches an uninterrupted run would have seen.
"""

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import fsspec
import numpy as np

from interp import paths

# File kinds `read_documents` understands, optionally compressed (fsspec infers it).
_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl",)
_COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst")


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
) -> list[str]:
    """Reads documents from `.txt` and `.jsonl` files, local or on any fsspec filesystem.

    `path` may be one file, a folder (every `.txt`/`.jsonl` file below it, recursively), or a
    glob (`gs://bucket/shard-*.jsonl`). Files are read in sorted path order, so the result is
    deterministic. Compressed files (`.txt.gz`, `.jsonl.zst`, ...) are decompressed on the fly.

    - `.txt`: by default the whole file is one document (its text unchanged): that suits a
      folder of articles or books, and keeps a long text's paragraphs in one stream. With
      `txt_paragraphs=True` every blank-line-separated paragraph is a document, whitespace
      collapsed (`split_paragraphs`), as `interp.data.corpus` does.
    - `.jsonl`: one JSON object per line; its `text_field` string is a document. Blank lines
      are skipped.

    Empty documents are dropped.

    Args:
        path: A file, folder or glob; local, or a URL such as `gs://...` (via fsspec/gcsfs).
        txt_paragraphs: Split `.txt` files into paragraphs instead of one document per file.
        text_field: The field of each JSON line that holds the text.
        encoding: Text encoding of the files.

    Returns:
        The documents, in file order then line/paragraph order.

    Raises:
        FileNotFoundError: Nothing matches `path`, or a folder or glob holds no readable file.
        ValueError: A file has an unknown suffix, or a JSON line is not an object with a
            string `text_field`.
    """
    documents = []
    for url in _resolve(os.fspath(path)):
        kind = _kind(url)
        if kind is None:
            raise ValueError(
                f"Do not know how to read {url}: expected .txt or .jsonl (optionally .gz, "
                f".bz2, .xz, .zst)."
            )
        with fsspec.open(url, "rt", encoding=encoding, compression="infer") as f:
            if kind == "txt":
                content = f.read()
                documents.extend(split_paragraphs(content) if txt_paragraphs else [content])
            else:
                documents.extend(_read_jsonl(f, url, text_field))
    return [document for document in documents if document.strip()]


def pack(
    documents: Iterable[str],
    tokenizer: Encoder,
    seq_len: int,
    *,
    add_bos: bool | None = None,
) -> np.ndarray:
    """Tokenizes documents into one stream and cuts it into rows for LM training.

    Each document is encoded as the tokenizer encodes a text by default, so with the special
    tokens the checkpoint puts around a text (Llama's and Gemma's bos first; none for GPT-2
    style tokenizers). An eos token goes between documents (not after the last one), unless
    one is there already: a document that ends with eos (a template adding it) or the next
    that starts with it (a bos that is also the eos, as in GPT-2) needs no second one. Rows are
    consecutive `seq_len`-token slices of the stream; the ragged tail shorter than `seq_len` is
    dropped, and a row may start inside a document. Special-token strings inside a document
    are tokenized as the tokenizer does (byte-level BPE from `interp.models.tokenizer` maps a
    literal '<|endoftext|>' to the special token, like Hugging Face).

    Args:
        documents: The texts.
        tokenizer: Has `encode_many(texts) -> list[list[int]]` and `eos_id` (not None), such
            as `interp.models.tokenizer.Tokenizer`.
        seq_len: Tokens per row, >= 1.
        add_bos: None: the tokenizer's convention. True / False: passed to
            `encode_many(texts, add_bos=...)` to force a bos at each document's start or none.

    Returns:
        int32 [N, seq_len], N = floor(stream length / seq_len); N may be 0.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise ValueError(
            "pack separates documents with the eos token, but the tokenizer has no eos_id. "
            "Load one with an eos token (tokenizer_config.json 'eos_token'), or pass "
            "eos_token= to Tokenizer.from_file / train_bpe."
        )
    eos = np.asarray([eos_id], np.int32)
    options = {} if add_bos is None else {"add_bos": add_bos}
    pieces, first, last = [], True, None  # `last`: the stream's last token so far.
    for chunk in _chunks(documents, 1024):  # Batched so the Rust tokenizer can parallelise.
        for ids in tokenizer.encode_many(chunk, **options):
            if not first and last != eos_id and not (ids and ids[0] == eos_id):
                pieces.append(eos)
                last = eos_id
            pieces.append(np.asarray(ids, np.int32))
            first, last = False, ids[-1] if ids else last
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    num_rows = len(stream) // seq_len
    return stream[: num_rows * seq_len].reshape(num_rows, seq_len)


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
        what = f"The folder {path} holds no .txt or .jsonl file"
    elif fs.isfile(root):
        return [path]
    else:
        raise FileNotFoundError(f"No such file or folder: {path}")
    if not found:
        raise FileNotFoundError(f"{what}; check the path.")
    return [fs.unstrip_protocol(p) if paths.is_remote(path) else p for p in sorted(found)]


def _kind(path: str) -> str | None:
    """'txt', 'jsonl' or None, from the suffix, ignoring a compression suffix."""
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


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most `size` items."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
