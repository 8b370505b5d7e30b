"""Parquet files and Hugging Face `datasets` folders as document streams (interp.data.columnar,
through interp.data.text): equal to the libraries' own reads, local and on gs://, streamed."""

import itertools
import string

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interp.data import columnar, text
from interp.models import tokenizer as tokenizer_lib

datasets.disable_progress_bars()

TEXTS = [f"Document {i}: " + "word " * (i % 5) for i in range(40)]


def _table(texts):
    return pa.table({"id": list(range(len(texts))), "text": texts, "score": [0.5] * len(texts)})


@pytest.fixture
def parquet_dir(tmp_path):
    """Two Parquet files of several row groups each, a null and a blank text among them."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    texts = list(TEXTS)
    texts[3], texts[25] = None, "   "
    pq.write_table(_table(texts[:30]), folder / "part-0.parquet", row_group_size=7)
    pq.write_table(_table(texts[30:]), folder / "part-1.parquet", row_group_size=4)
    assert pq.ParquetFile(folder / "part-0.parquet").num_row_groups == 5
    return folder


def _pyarrow_reference(folder):
    """The documents as pyarrow reads them whole, nulls and blank texts dropped."""
    paths = sorted(folder.glob("*.parquet"))
    texts = pa.concat_tables([pq.read_table(p) for p in paths]).column("text").to_pylist()
    return [t for t in texts if t is not None and t.strip()]


@pytest.fixture
def hf_dataset(tmp_path):
    """A Dataset saved in 3 shards and a DatasetDict, written by the real `datasets`."""
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    dataset.save_to_disk(str(tmp_path / "dataset"), num_shards=3)
    splits = datasets.DatasetDict({
        "train": dataset.select(range(30)),
        "validation": datasets.Dataset.from_dict({"text": ["held out one", "held out two"]}),
    })  # fmt: skip
    splits.save_to_disk(str(tmp_path / "dataset_dict"))
    return tmp_path


def test_parquet_file_folder_and_glob_match_pyarrow(parquet_dir):
    expected = _pyarrow_reference(parquet_dir)
    assert len(expected) == 38
    assert text.read_documents(parquet_dir) == expected
    assert text.read_documents(str(parquet_dir / "part-*.parquet")) == expected
    assert text.read_documents(parquet_dir / "part-1.parquet") == TEXTS[30:]
    tok = tokenizer_lib.train_bpe(TEXTS, vocab_size=300)
    np.testing.assert_array_equal(
        text.pack(text.iter_documents(parquet_dir), tok, seq_len=8),
        text.pack(expected, tok, seq_len=8),
    )


def test_hf_dataset_and_dataset_dict_match_datasets(hf_dataset):
    assert len(list((hf_dataset / "dataset").glob("*.arrow"))) == 3
    reference = datasets.load_from_disk(str(hf_dataset / "dataset"))["text"]
    assert text.read_documents(hf_dataset / "dataset") == reference == TEXTS
    # A DatasetDict: 'train' by default, another split by name, or its split folder directly.
    splits = datasets.load_from_disk(str(hf_dataset / "dataset_dict"))
    assert text.read_documents(hf_dataset / "dataset_dict") == splits["train"]["text"]
    assert text.read_documents(hf_dataset / "dataset_dict", split="validation") == [
        "held out one",
        "held out two",
    ]
    assert text.read_documents(hf_dataset / "dataset_dict" / "validation") == [
        "held out one",
        "held out two",
    ]
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        text.read_documents(hf_dataset / "dataset_dict", split="test")
    with pytest.raises(ValueError, match="single Dataset, which has no splits"):
        text.read_documents(hf_dataset / "dataset", split="train")


def test_arrow_file_format_is_read_too(tmp_path):
    # The random-access IPC format (pyarrow.feather / ipc.new_file), besides datasets' streams.
    with pa.ipc.new_file(tmp_path / "a.arrow", _table(TEXTS).schema) as writer:
        for start in range(0, len(TEXTS), 16):
            writer.write_table(_table(TEXTS[start : start + 16]))
    assert text.read_documents(tmp_path / "a.arrow") == TEXTS


def test_missing_text_column_and_unknown_format_are_clear_errors(parquet_dir, hf_dataset):
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are \['id', 'text'"):
        text.read_documents(parquet_dir, text_field="body")
    with pytest.raises(ValueError, match=r"no column 'content'; its columns are \['text', 'id'"):
        text.read_documents(hf_dataset / "dataset", text_field="content")
    with pytest.raises(ValueError, match=r"column 'score' holds double, not strings"):
        text.read_documents(parquet_dir, text_field="score")
    (parquet_dir / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"table.csv: expected .txt, .jsonl .*\.parquet, \.arrow"):
        text.read_documents(str(parquet_dir / "*"))


def test_parquet_and_hf_datasets_on_gcs(gcs_bucket, parquet_dir, hf_dataset):
    fs, _ = fsspec.core.url_to_fs(gcs_bucket)
    fs.put(str(parquet_dir), f"{gcs_bucket}/parquet", recursive=True)
    fs.put(str(hf_dataset / "dataset"), f"{gcs_bucket}/dataset", recursive=True)
    fs.put(str(hf_dataset / "dataset_dict"), f"{gcs_bucket}/dataset_dict", recursive=True)
    expected = _pyarrow_reference(parquet_dir)
    assert text.read_documents(f"{gcs_bucket}/parquet") == expected
    assert text.read_documents(f"{gcs_bucket}/parquet/*.parquet") == expected
    assert text.read_documents(f"{gcs_bucket}/dataset") == TEXTS
    assert text.read_documents(f"{gcs_bucket}/dataset_dict", split="validation") == [
        "held out one",
        "held out two",
    ]
    assert columnar.hf_dataset_files(f"{gcs_bucket}/dataset")[0].startswith("gs://")


# ---------------------------------------------------------------------------- streaming

_POOLS = []  # Proxy pools stay alive: buffers they allocated may be freed after the test.


def _bytes_read_and_arrow_peak(fn):
    """(bytes this process read from files, peak bytes in pyarrow's memory pool) during fn()."""

    def read_so_far():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    start = read_so_far()
    try:
        fn()
    finally:
        pa.set_memory_pool(default)
    return read_so_far() - start, pool.max_memory()


def _random_texts(count, length, seed=0):
    """Incompressible texts: a file's size is then about its text's size."""
    letters = np.frombuffer(string.ascii_letters.encode(), np.uint8)
    codes = np.random.default_rng(seed).choice(letters, (count, length))
    return [row.tobytes().decode() for row in codes]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_reading_the_first_rows_reads_one_row_group_not_the_file(tmp_path, kind):
    # 40 row groups (record batches: datasets writes 1000 rows each) of 1000 documents of 200
    # characters: 8 MB of text.
    texts = _random_texts(40_000, 200)
    if kind == "parquet":
        path = tmp_path / "big.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    else:
        path = tmp_path / "dataset"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path), num_shards=1)
    group_bytes = 1000 * 200
    tok = tokenizer_lib.train_bpe(texts[:20], vocab_size=300)

    def first_documents():
        assert list(itertools.islice(text.iter_documents(path), 5)) == texts[:5]

    def first_rows():
        rows = text.pack(text.iter_documents(path), tok, seq_len=64, max_rows=50)
        np.testing.assert_array_equal(rows, text.pack(texts[:200], tok, 64)[:50])

    for fn in (first_documents, first_rows):
        read, peak = _bytes_read_and_arrow_peak(fn)
        assert read < 3 * group_bytes, (fn.__name__, read)
        assert peak < 3 * group_bytes, (fn.__name__, peak)
    # The measurements see whole reads: all documents (bytes read), and for Parquet, whose
    # pages pyarrow decodes into its pool, a whole table (peak). (An IPC stream read from a
    # Python file keeps the bytes Python read, outside the pool: bytes read is its measure.)
    read, _ = _bytes_read_and_arrow_peak(lambda: text.read_documents(path))
    assert read > 30 * group_bytes
    if kind == "parquet":
        _, peak = _bytes_read_and_arrow_peak(lambda: pq.read_table(path))
        assert peak > 30 * group_bytes


def test_a_dictionary_encoded_text_column_is_read_as_its_strings(tmp_path):
    # pandas writes a categorical column (repeated texts) dictionary-encoded; Parquet keeps
    # that type. Its values are strings, not a wrong column.
    table = pa.table({"text": pa.array(TEXTS + [None] + TEXTS[:3]).dictionary_encode()})
    pq.write_table(table, tmp_path / "dict.parquet")
    with pa.ipc.new_file(tmp_path / "dict.arrow", table.schema) as writer:
        writer.write_table(table)
    for name in ("dict.parquet", "dict.arrow"):
        assert text.read_documents(tmp_path / name) == TEXTS + TEXTS[:3]
    ints = pa.table({"text": pa.array([1, 2, 1]).dictionary_encode()})
    pq.write_table(ints, tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="holds int64, not strings"):
        text.read_documents(tmp_path / "ints.parquet")
