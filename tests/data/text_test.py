"""Tests for interp.data.text: reading documents, packing, resumable batches."""

import gzip
import json

import numpy as np
import pytest
import tokenizers

from interp.data import text
from interp.models import tokenizer as tokenizer_lib


class CharTokenizer:
    """Hand-computable tokenizer: 'a' -> 1, 'b' -> 2, ...; eos is 0."""

    eos_id = 0

    def encode_many(self, texts):
        return [[ord(c) - ord("a") + 1 for c in t] for t in texts]


# ---------------------------------------------------------------------------- reading


def test_split_paragraphs():
    raw = "  First line\r\nsame   paragraph.\r\n\r\n\r\nSecond.\n \t \nThird\n\n\n"
    assert text.split_paragraphs(raw) == [
        "First line same paragraph.",
        "Second.",
        "Third",
    ]
    assert text.split_paragraphs("\n\n  \n") == []


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "b.txt").write_text("Book b, paragraph one.\n\nParagraph  two.\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"})
    )
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "c.txt.gz", "wt") as f:
        f.write("Compressed café.")
    (tmp_path / "notes.md").write_text("not a document")
    (tmp_path / "empty.txt").write_text("\n\n")
    return tmp_path


def test_read_documents_folder_in_sorted_order(corpus_dir):
    assert text.read_documents(corpus_dir) == [
        "json one",
        "json two",
        "Book b, paragraph one.\n\nParagraph  two.\n",  # Whole file, unchanged.
        "Compressed café.",
    ]


def test_read_documents_txt_paragraphs(corpus_dir):
    assert text.read_documents(corpus_dir / "b.txt", txt_paragraphs=True) == [
        "Book b, paragraph one.",
        "Paragraph two.",
    ]


def test_read_documents_glob_and_file(corpus_dir):
    assert text.read_documents(str(corpus_dir / "*.jsonl")) == ["json one", "json two"]
    assert text.read_documents(corpus_dir / "sub" / "c.txt.gz") == ["Compressed café."]


def test_read_documents_fsspec_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/text_test/x/1.txt", b"one")
    fs.pipe("/text_test/x/2.jsonl", b'{"body": "two"}\n')
    assert text.read_documents("memory://text_test/x/1.txt") == ["one"]
    assert text.read_documents("memory://text_test/x/*.jsonl", text_field="body") == ["two"]


def test_read_documents_errors(corpus_dir):
    with pytest.raises(FileNotFoundError, match="No such file"):
        text.read_documents(corpus_dir / "missing")
    with pytest.raises(FileNotFoundError, match="No file matches"):
        text.read_documents(str(corpus_dir / "*.parquet"))
    with pytest.raises(ValueError, match=r"expected .txt, .jsonl .*\.parquet, \.arrow"):
        text.read_documents(corpus_dir / "notes.md")
    (corpus_dir / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
        text.read_documents(corpus_dir / "bad.jsonl")
    (corpus_dir / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        text.read_documents(corpus_dir / "bad.jsonl")
    (corpus_dir / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no readable file \(\.txt, \.jsonl"):
        text.read_documents(corpus_dir / "nothing")


# ---------------------------------------------------------------------------- packing


def test_pack_hand_made_example():
    # Stream: a b <eos> c d e <eos> f g -> [1 2 0 3 4 5 0 6 7]; rows of 4; tail [7] dropped.
    rows = text.pack(["ab", "cde", "fg"], CharTokenizer(), seq_len=4)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [[1, 2, 0, 3], [4, 5, 0, 6]])
    np.testing.assert_array_equal(
        text.pack(["ab", "cde", "fg"], CharTokenizer(), seq_len=3),
        [[1, 2, 0], [3, 4, 5], [0, 6, 7]],
    )


def test_pack_edge_cases():
    assert text.pack([], CharTokenizer(), 4).shape == (0, 4)
    assert text.pack(["abc"], CharTokenizer(), 4).shape == (0, 4)
    np.testing.assert_array_equal(text.pack(iter(["abcd"]), CharTokenizer(), 2), [[1, 2], [3, 4]])


def test_pack_with_real_tokenizer():
    documents = ["The quick brown fox.", "Jumps over the lazy dog!", "Café ☕"] * 30
    tok = tokenizer_lib.train_bpe(documents, vocab_size=300)
    rows = text.pack(documents, tok, seq_len=16)
    stream = []
    for document in documents:
        stream += tok.encode(document) + [tok.eos_id]
    expected = np.asarray(stream[:-1][: rows.size], np.int32).reshape(-1, 16)
    np.testing.assert_array_equal(rows, expected)
    assert rows.shape[0] == (len(stream) - 1) // 16
    assert tok.decode(rows[0], skip_special_tokens=False).startswith(documents[0] + "<|endoftext|>")


def test_pack_errors():
    no_eos = CharTokenizer()
    no_eos.eos_id = None
    with pytest.raises(ValueError, match="no eos_id"):
        text.pack(["ab"], no_eos, 4)
    with pytest.raises(ValueError, match="seq_len"):
        text.pack(["ab"], CharTokenizer(), 0)


# ---------------------------------------------------------------------------- batches


def numbered_rows(num_rows, seq_len=3):
    """Row i is [i*seq_len, ..., i*seq_len + seq_len - 1], so a row's first token names it."""
    return np.arange(num_rows * seq_len, dtype=np.int32).reshape(num_rows, seq_len)


def row_ids(batch):
    return (batch[:, 0] // batch.shape[1]).tolist()


def test_batches_shape_and_rows():
    tokens = numbered_rows(10)
    batches = text.Batches(tokens, batch_size=4, seed=0)
    assert batches.steps_per_epoch == 2
    batch = batches.get(0)
    assert batch.shape == (4, 3) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, tokens[batches.indices(0)])


def test_batches_deterministic_and_seeded():
    tokens = numbered_rows(50)
    first = [text.Batches(tokens, 8, seed=3).get(step) for step in range(20)]
    again = [text.Batches(tokens, 8, seed=3).get(step) for step in range(20)]
    other = [text.Batches(tokens, 8, seed=4).get(step) for step in range(20)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert row_ids(first[0]) != list(range(8))  # Shuffled.


def test_batches_resume_equals_uninterrupted_run():
    tokens = numbered_rows(23)
    uninterrupted = text.Batches(tokens, 5, seed=1).iterate()
    run = [next(uninterrupted) for _ in range(30)]  # 4 steps per epoch: crosses 7 epochs.
    for start in (0, 1, 3, 4, 13, 29):
        resumed = text.Batches(tokens, 5, seed=1).iterate(start_step=start)  # Fresh object.
        tail = [next(resumed) for _ in range(30 - start)]
        np.testing.assert_array_equal(tail, run[start:])
    # Random access in any order agrees too (the permutation cache is not state).
    batches = text.Batches(tokens, 5, seed=1)
    for step in (17, 2, 29, 2, 0, 16):
        np.testing.assert_array_equal(batches.get(step), run[step])


def test_batches_epoch_boundary():
    num_rows, batch_size = 23, 5  # 4 full batches per epoch; 3 rows skipped each epoch.
    batches = text.Batches(numbered_rows(num_rows), batch_size, seed=0)
    epochs = []
    for epoch in range(3):
        steps = range(epoch * 4, (epoch + 1) * 4)
        seen = [i for step in steps for i in row_ids(batches.get(step))]
        assert len(seen) == len(set(seen)) == 20  # No row twice within an epoch.
        assert set(seen) <= set(range(num_rows))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # A fresh permutation each epoch.
    # The skipped rows differ between epochs, so over a few epochs every row is used.
    assert set().union(*map(set, epochs)) == set(range(num_rows))


def test_batches_whole_dataset_batch():
    batches = text.Batches(numbered_rows(4), batch_size=4, seed=0)
    assert batches.steps_per_epoch == 1
    assert sorted(row_ids(batches.get(0))) == sorted(row_ids(batches.get(1))) == [0, 1, 2, 3]


def test_batches_errors():
    with pytest.raises(ValueError, match="batch_size must be in"):
        text.Batches(numbered_rows(3), batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        text.Batches(np.zeros(5, np.int32), batch_size=1, seed=0)
    with pytest.raises(ValueError, match="step must be"):
        text.Batches(numbered_rows(3), batch_size=1, seed=0).get(-1)


# ---------------------------------------------------------------------------- gs://


def test_read_documents_from_gcs(gcs_bucket):
    # `gcs_bucket` (tests/conftest.py) points gcsfs at a local fake-gcs-server.
    import fsspec

    fs, _ = fsspec.core.url_to_fs(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/docs/a.txt", b"First.\n\nSecond.")
    fs.pipe(f"{gcs_bucket}/docs/b.jsonl", b'{"text": "json"}\n')
    with fsspec.open(f"{gcs_bucket}/docs/sub/c.txt.gz", "wt", compression="gzip") as f:
        f.write("zipped")
    assert text.read_documents(f"{gcs_bucket}/docs") == [
        "First.\n\nSecond.",
        "json",
        "zipped",
    ]
    assert text.read_documents(f"{gcs_bucket}/docs/*.txt", txt_paragraphs=True) == [
        "First.",
        "Second.",
    ]
    assert text.read_documents(f"{gcs_bucket}/docs/b.jsonl") == ["json"]


def _template_tokenizer(template, bos, eos):
    """A trained BPE whose post-processor puts special tokens around each text."""
    documents = ["The quick brown fox.", "Jumps over the lazy dog!"] * 20
    backend = tokenizer_lib.train_bpe(documents, 300, special_tokens=["<|eot|>", "<s>"]).backend
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[("<|eot|>", 0), ("<s>", 1)]
    )
    return tokenizer_lib.Tokenizer(backend, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize(
    "template, bos, eos, pattern",
    [
        # Llama / Gemma: a bos starts every document; eos separates them.
        ("<s> $A", "<s>", "<|eot|>", "<s> a <|eot|> <s> b <|eot|> <s> c"),
        # A template that ends texts with eos needs no second one between documents.
        ("<s> $A <|eot|>", "<s>", "<|eot|>", "<s> a <|eot|> <s> b <|eot|> <s> c <|eot|>"),
        # GPT-2 style bos that is also the eos: it already separates the documents.
        ("<|eot|> $A", "<|eot|>", "<|eot|>", "<|eot|> a <|eot|> b <|eot|> c"),
        ("$A", "<s>", "<|eot|>", "a <|eot|> b <|eot|> c"),
    ],
)
def test_pack_follows_the_tokenizers_conventions(template, bos, eos, pattern):
    tok = _template_tokenizer(template, bos, eos)
    documents = ["The quick brown fox.", "Jumps over", "the lazy dog!"]
    pieces = {"a": documents[0], "b": documents[1], "c": documents[2]}
    stream = []
    for part in pattern.split():
        if part in pieces:
            stream += tok.encode(pieces[part], add_bos=False, add_eos=False)
        else:
            stream.append(tok.backend.token_to_id(part))
    rows = text.pack(documents, tok, seq_len=1)
    np.testing.assert_array_equal(rows[:, 0], stream)
    # An explicit add_bos overrides the tokenizer: no bos at all.
    bare = text.pack(documents, tok, seq_len=1, add_bos=False)[:, 0].tolist()
    assert tok.bos_id not in bare or tok.bos_id == tok.eos_id


def test_pack_max_rows_is_a_prefix_and_reads_only_what_it_needs():
    documents = [chr(ord("a") + i % 26) * (1 + i % 7) for i in range(2000)]
    whole = text.pack(documents, CharTokenizer(), seq_len=5)
    consumed = []

    def stream():
        for document in documents:
            consumed.append(document)
            yield document

    first = text.pack(stream(), CharTokenizer(), seq_len=5, max_rows=10)
    np.testing.assert_array_equal(first, whole[:10])
    # 10 rows of 5 tokens are about 13 documents of 4 tokens with their eos; the tokenizer
    # gets documents a few at a time (8, then 32), so at most 40 are read, not 2000.
    assert len(consumed) <= 40
    assert text.pack(documents, CharTokenizer(), 5, max_rows=10**6).shape == whole.shape
    assert text.pack(documents, CharTokenizer(), 5, max_rows=0).shape == (0, 5)
    with pytest.raises(ValueError, match="max_rows"):
        text.pack(documents, CharTokenizer(), 5, max_rows=-1)


def test_pack_separators_eos_none_and_a_token_string():
    docs = ["ab", "c", "de"]
    assert text.pack(docs, CharTokenizer(), 3).tolist() == [[1, 2, 0], [3, 0, 4]]
    assert text.pack(docs, CharTokenizer(), 5, separator=None).tolist() == [[1, 2, 3, 4, 5]]
    tok = tokenizer_lib.train_bpe(
        ["hello world"] * 3, vocab_size=270, special_tokens=("<|endoftext|>", "<|im_end|>")
    )
    end = tok.backend.token_to_id("<|endoftext|>")
    turn = tok.backend.token_to_id("<|im_end|>")
    assert tok.eos_id == end  # train_bpe's first special token; use the other one here.
    rows = text.pack(["hello", "world"], tok, 3, separator="<|im_end|>")
    stream = rows.reshape(-1).tolist()
    hello, world = tok.encode("hello", add_bos=False), tok.encode("world", add_bos=False)
    assert stream == (hello + [turn] + world)[: len(stream)]
    with pytest.raises(ValueError, match="'hello world' is 2 tokens"):
        text.pack(["a"], tok, 3, separator="hello world")
