"""Documents from columnar files: Parquet, and Hugging Face `datasets` folders saved to disk.

    for document in columnar.read_parquet('gs://bucket/fineweb/000_00000.parquet'):
        ...
    urls = columnar.hf_dataset_files('/data/pile_dict', split='train')  # its .arrow files
    for document in columnar.read_arrow(urls[0]):
        ...

Both readers stream: a Parquet file is read one row group at a time (only the text column's
pages of that group are fetched), an Arrow file one record batch at a time, so memory holds one
row group or batch whatever the file's size, and a reader that is not iterated to the end never
fetches the rest of the file. Files are opened through fsspec, so any path fsspec knows works
(local, `gs://` through gcsfs, `memory://`).

A `datasets` folder is what `Dataset.save_to_disk` writes (`state.json`, `dataset_info.json`,
`data-0000i-of-0000n.arrow`, the .arrow files Arrow IPC streams listed in `state.json`) or what
`DatasetDict.save_to_disk` writes (`dataset_dict.json` naming the splits, one such folder per
split). `pyarrow` reads them; the `datasets` library is not needed.
"""

import json
import posixpath
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from interp import paths

# The files that mark a `save_to_disk` folder.
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"

# Arrow IPC *file* format (random access) starts with this; the stream format (what `datasets`
# writes) does not.
_ARROW_FILE_MAGIC = b"ARROW1"
_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())


def is_hf_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    fs, root = fsspec.core.url_to_fs(path)
    return fs.isfile(posixpath.join(root, DATASET_STATE)) or fs.isfile(
        posixpath.join(root, DATASET_DICT)
    )


def hf_dataset_files(path: str, split: str = "") -> list[str]:
    """The .arrow files of a `save_to_disk` folder, in the dataset's row order.

    Args:
        path: A `Dataset.save_to_disk` folder, or a `DatasetDict.save_to_disk` folder; local
            or a URL such as `gs://...`.
        split: For a DatasetDict folder, the split to read; '' = 'train'. Must be '' for a
            single Dataset folder (point `path` at a DatasetDict's split folder to read it).

    Returns:
        The URLs (or local paths) of the split's Arrow IPC stream files, in `state.json` order.

    Raises:
        FileNotFoundError: `path` is not a `save_to_disk` folder, or a listed file is missing.
        ValueError: The split is not in the DatasetDict (the message lists its splits), or a
            split was asked of a single Dataset.
    """
    fs, root = fsspec.core.url_to_fs(path)
    dict_file = posixpath.join(root, DATASET_DICT)
    if fs.isfile(dict_file):
        splits = json.loads(fs.cat_file(dict_file))["splits"]
        chosen = split or "train"
        if chosen not in splits:
            raise ValueError(
                f"{path} is a DatasetDict with splits {splits}, not {chosen!r}; set the split "
                f"(config.data.split) to one of them."
            )
        root = posixpath.join(root, chosen)
    elif split:
        raise ValueError(
            f"{path} is a single Dataset, which has no splits; set split='' (config.data.split) "
            f"to read it, or point the path at a DatasetDict folder."
        )
    state_file = posixpath.join(root, DATASET_STATE)
    if not fs.isfile(state_file):
        raise FileNotFoundError(
            f"{path} is not a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk "
            f"(no {DATASET_STATE} or {DATASET_DICT} in {fs.unstrip_protocol(root)})."
        )
    state = json.loads(fs.cat_file(state_file))
    files = [posixpath.join(root, entry["filename"]) for entry in state["_data_files"]]
    missing = [f for f in files if not fs.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{path}'s {DATASET_STATE} lists files that are not there: {missing}; the folder is "
            f"incomplete (copy it again)."
        )
    return [fs.unstrip_protocol(f) if paths.is_remote(path) else f for f in files]


def read_parquet(url: str, text_field: str = "text") -> Iterator[str]:
    """Yields the `text_field` strings of a Parquet file, one row group at a time.

    Each row group is read on its own (`pre_buffer` coalesces that group's reads only), so a
    reader stopped early has fetched only the groups it yielded from. Null values are skipped.

    Args:
        url: A .parquet file, local or a URL such as `gs://...`.
        text_field: The string column that holds the text.

    Yields:
        The non-null strings, in row order.

    Raises:
        ValueError: The file has no string column `text_field` (the message lists its columns).
    """
    with fsspec.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        _check_column(parquet.schema_arrow, url, text_field)
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(
                row_groups=[group], columns=[text_field], use_threads=False
            ):
                yield from _strings(batch.column(0))


def read_arrow(url: str, text_field: str = "text") -> Iterator[str]:
    """Yields the `text_field` strings of an Arrow IPC file, one record batch at a time.

    Both IPC formats are read: the stream format (`datasets` writes it, in batches of 1000
    rows by default) and the random-access file format (`.arrow` / Feather v2 files).

    Args:
        url: A .arrow file, local or a URL such as `gs://...`.
        text_field: The string column that holds the text.

    Yields:
        The non-null strings, in row order.

    Raises:
        ValueError: The file has no string column `text_field` (the message lists its columns).
    """
    with fsspec.open(url, "rb") as f:
        is_file_format = f.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
        f.seek(0)
        if is_file_format:
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(f)
            batches = iter(reader)
        _check_column(reader.schema, url, text_field)
        for batch in batches:
            yield from _strings(batch.column(text_field))


def _check_column(schema: pa.Schema, url: str, text_field: str) -> None:
    """Raises unless `schema` has a string column `text_field`."""
    if text_field not in schema.names:
        raise ValueError(
            f"{url} has no column {text_field!r}; its columns are {schema.names}. Set the text "
            f"column (config.data.text_field, or text_field=) to the one holding the text."
        )
    column_type = schema.field(text_field).type
    if pa.types.is_dictionary(column_type):  # A categorical column (pandas) stays encoded.
        column_type = column_type.value_type  # Its values decode in `_strings`.
    if column_type not in _STRING_TYPES:
        raise ValueError(
            f"{url}'s column {text_field!r} holds {column_type}, not strings; set the text "
            f"column (config.data.text_field) to a string column of {schema.names}."
        )


def _strings(column: pa.Array) -> Iterator[str]:
    """The non-null values of a string column (or dictionary-encoded one), as Python strings."""
    return (value for value in column.to_pylist() if value is not None)
