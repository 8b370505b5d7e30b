"""A job's documents (interp.data.documents): streamed sources, their held-out split, packing
only the rows a job needs, and the explicit BOS setting."""

import json

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from interp.data import documents as documents_lib
from interp.data import text
from interp.models import tokenizer as tokenizer_lib

TEXTS = [f"Document number {i} says {'ab' * (i % 7)}." for i in range(600)]


def _config(path, **overrides):
    return ml_collections.ConfigDict(
        dict(text_path=str(path), heldout_fraction=0.1, text_field="text", split="",
             prepend_bos="tokenizer", seq_len=16, max_documents=0) | overrides
    )  # fmt: skip


@pytest.fixture
def parquet_path(tmp_path):
    path = tmp_path / "corpus.parquet"
    # A repeated text: duplicates must fall on one side of the split.
    pq.write_table(pa.table({"text": TEXTS + TEXTS[:50]}), path, row_group_size=64)
    return path


def test_streamed_source_split_by_hash_deterministic_and_disjoint(parquet_path):
    train, heldout = documents_lib.documents(_config(parquet_path))
    assert isinstance(train, text.DocumentStream) and isinstance(heldout, text.DocumentStream)
    train, heldout = list(train), list(heldout)
    assert not set(train) & set(heldout)
    assert sorted(set(train) | set(heldout)) == sorted(TEXTS)
    assert len(train) + len(heldout) == 650  # Duplicates kept, on the same side.
    assert heldout == [t for t in TEXTS + TEXTS[:50] if documents_lib.is_heldout(t, 0.1)]
    assert 30 < len(set(heldout)) < 90  # About 10% of 600.
    # The split does not depend on the file layout: the same texts reversed and resharded.
    pq.write_table(pa.table({"text": TEXTS[::-1]}), parquet_path, row_group_size=7)
    again = list(documents_lib.documents(_config(parquet_path))[1])
    assert sorted(again) == sorted(set(heldout))
    # max_documents: that many training documents and a tenth as many held out.
    train, heldout = documents_lib.documents(_config(parquet_path, max_documents=40))
    assert len(list(train)) == 40 and len(list(heldout)) == 4


def test_pack_rows_packs_a_stream_only_as_far_as_needed(parquet_path):
    tok = tokenizer_lib.train_bpe(TEXTS, vocab_size=300)
    config = _config(parquet_path)
    train, _ = documents_lib.documents(config)
    rows = documents_lib.pack_rows(config, train, tok, needed=12)
    everything = text.pack(list(train), tok, seq_len=16)
    assert len(everything) > 100
    np.testing.assert_array_equal(rows, everything[:12])
    # A list (an in-memory source) is packed whole: the job draws from all of its rows.
    assert len(documents_lib.pack_rows(config, list(train), tok, needed=12)) == len(everything)


def test_text_files_keep_their_split_and_are_lists(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i}." for i in range(20)))
    train, heldout = documents_lib.documents(_config(tmp_path))
    assert train == [f"Paragraph {i}." for i in range(18)]
    assert heldout == ["Paragraph 18.", "Paragraph 19."]


def test_config_errors(parquet_path, tmp_path):
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\)"):
        documents_lib.documents(_config(parquet_path, heldout_fraction=0.0))
    with pytest.raises(ValueError, match=r"prepend_bos must be one of \['always', 'never'"):
        documents_lib.documents(_config(parquet_path, prepend_bos="yes"))
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(ValueError, match="mixes text files"):
        documents_lib.documents(_config(tmp_path))
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are \['text'\]"):
        next(iter(documents_lib.documents(_config(parquet_path, text_field="body"))[0]))


def _tokenizer(template, bos, eos):
    backend = tokenizer_lib.train_bpe(TEXTS, 300, special_tokens=["<|eot|>", "<s>"]).backend
    if template:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[("<|eot|>", 0), ("<s>", 1)]
        )
    return tokenizer_lib.Tokenizer(backend, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize(
    "template, bos, prepend_bos, pattern",
    [
        # Llama / Gemma: the tokenizer's own bos; 'always' adds no second one.
        ("<s> $A", "<s>", "tokenizer", "<s> a <|eot|> <s> b"),
        ("<s> $A", "<s>", "always", "<s> a <|eot|> <s> b"),
        ("<s> $A", "<s>", "never", "a <|eot|> b"),
        # GPT-2: no bos by convention; 'always' puts <|eot|> (its bos, also the eos) first.
        ("", "<|eot|>", "tokenizer", "a <|eot|> b"),
        ("", "<|eot|>", "always", "<|eot|> a <|eot|> b"),
        ("", "<|eot|>", "never", "a <|eot|> b"),
    ],
)
def test_prepend_bos_modes(template, bos, prepend_bos, pattern):
    tok = _tokenizer(template, bos, "<|eot|>")
    docs = {"a": TEXTS[1], "b": TEXTS[2]}
    stream = []
    for part in pattern.split():
        if part in docs:
            stream += tok.encode(docs[part], add_bos=False, add_eos=False)
        else:
            stream.append(tok.backend.token_to_id(part))
    config = _config("", seq_len=1, prepend_bos=prepend_bos)
    rows = documents_lib.pack_rows(config, list(docs.values()), tok, needed=0)
    assert rows[:, 0].tolist() == stream


def test_prepend_bos_always_without_a_bos_token_is_an_error():
    tok = _tokenizer("", None, "<|eot|>")
    config = _config("", prepend_bos="always")
    with pytest.raises(ValueError, match="the tokenizer has no bos token"):
        documents_lib.pack_rows(config, TEXTS[:3], tok, needed=0)
    config.prepend_bos = "never"
    assert documents_lib.pack_rows(config, TEXTS[:3], tok, needed=0).size


def test_no_whole_row_is_an_error_naming_the_source(tmp_path):
    # A corpus of nulls and blanks (or too short) gives no row: said here, not as an empty
    # activation stream or batch later.
    tok = tokenizer_lib.train_bpe(TEXTS, vocab_size=300)
    path = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"text": pa.array([None, "", "  \n", None], pa.string())}), path)
    config = _config(path, heldout_fraction=0.5)
    train, heldout = documents_lib.documents(config)
    with pytest.raises(ValueError, match=r"No row of 16 tokens from train documents of .*blank"):
        documents_lib.pack_rows(config, train, tok, needed=4)
    with pytest.raises(ValueError, match="No row of 16 tokens from 1 documents"):
        documents_lib.pack_rows(config, ["Too short."], tok, needed=4)
    assert documents_lib.pack_rows(config, train, tok, needed=0).shape == (0, 16)


def test_sample_rows_spread_over_every_document_deterministic_by_seed(tmp_path):
    # Five "books" in source order, each many rows long: the first rows are the first book.
    books = [" ".join(f"{word}{i}" for i in range(300)) for word in "abcde"]
    (tmp_path / "books.jsonl").write_text("\n".join(json.dumps({"text": b}) for b in books))
    tok = tokenizer_lib.train_bpe(books, vocab_size=300)
    config = _config(tmp_path / "books.jsonl")
    everything = documents_lib.pack_rows(config, books, tok, needed=0)
    assert len(everything) > 100
    rows = documents_lib.sample_rows(config, books, tok, 12, seed=0)
    assert rows.shape == (12, 16)
    # Each row is a row of the whole packing, in source order, and every book is seen.
    index = [next(i for i, row in enumerate(everything) if (row == r).all()) for r in rows]
    assert index == sorted(index) and len(set(index)) == 12
    letters = {c for r in rows for c in tok.decode(r.tolist()) if c.isalpha()}
    assert letters >= set("abcde"), letters
    np.testing.assert_array_equal(documents_lib.sample_rows(config, books, tok, 12, seed=0), rows)
    assert not np.array_equal(documents_lib.sample_rows(config, books, tok, 12, seed=1), rows)
    # A larger sample keeps the smaller one's rows; as many as there are: all of them.
    more = documents_lib.sample_rows(config, books, tok, 40, seed=0)
    assert {r.tobytes() for r in rows} <= {r.tobytes() for r in more}
    np.testing.assert_array_equal(
        documents_lib.sample_rows(config, books, tok, 10_000, seed=0), everything
    )
    np.testing.assert_array_equal(documents_lib.sample_indices(5, 9, seed=3), np.arange(5))
    with pytest.raises(ValueError, match="count must be >= 0"):
        documents_lib.sample_indices(5, -1, seed=3)


def test_sample_rows_of_a_stream_reads_only_its_first_rows(parquet_path):
    tok = tokenizer_lib.train_bpe(TEXTS, vocab_size=300)
    config = _config(parquet_path)
    train, _ = documents_lib.documents(config)
    np.testing.assert_array_equal(
        documents_lib.sample_rows(config, train, tok, 12, seed=0),
        documents_lib.pack_rows(config, train, tok, needed=12),
    )
