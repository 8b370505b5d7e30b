"""Safetensors files, read and written here directly, local or remote (gs://).

    tensors = safetensors_io.read("/ckpt/model.safetensors")   # {name: array}, memory-mapped
    weights = safetensors_io.SafetensorsFile("gs://b/m/model.safetensors")  # read when looked up
    safetensors_io.write("gs://b/sae/sae_weights.safetensors", tensors)

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian bytes. Reading it ourselves makes bfloat16
and the float8 types work with any safetensors / NumPy version, and lets large local shards be
memory-mapped and large remote ones read tensor by tensor with byte ranges, instead of whole.
Both the model folders (`interp.models`) and the SAE folders (`interp.sae.io`) use this one
module.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from interp import paths

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Safetensors dtype name of each NumPy dtype ('F32', 'BF16', ...).
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _header_size(first: bytes, available: int, where: str) -> int:
    """The header length from the first 8 bytes, checked against the file's size."""
    if len(first) < 8:
        raise ValueError(f"{where} is not a safetensors file: {len(first)} bytes, under 8.")
    (size,) = struct.unpack("<Q", first[:8])
    if size > available - 8:
        raise ValueError(
            f"{where} is truncated or not a safetensors file: its header length is {size} "
            f"bytes, the file holds {available}; re-export or re-download it."
        )
    return size


def _parse_header(header_bytes: bytes, where: str) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not a safetensors file (bad header: {e}).") from e
    header.pop("__metadata__", None)
    return header


def _checked_entries(header: Mapping[str, Any], available: int, where: str) -> dict[str, Any]:
    """{name: (dtype, shape, start, stop)} of the header, each checked against the data size."""
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"Tensor {name!r} in {where} has unsupported dtype {info['dtype']}.")
        start, stop = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")
        expected = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if stop - start != expected:
            raise ValueError(
                f"Tensor {name!r} in {where} spans {stop - start} bytes, but shape "
                f"{info['shape']} of {info['dtype']} needs {expected}; the file is corrupt."
            )
        if stop > available:
            raise ValueError(
                f"{where} is truncated: tensor {name!r} ends at byte {stop} of the data, which "
                f"holds {available}; re-export or re-download the file."
            )
        entries[name] = (dtype, tuple(info["shape"]), start, stop)
    return entries


def _view(entry, data: np.ndarray) -> np.ndarray:
    dtype, shape, start, stop = entry
    return data[start:stop].view(dtype).reshape(shape)


# Bytes read first from a remote file: the header of a model with a few hundred tensors fits,
# so opening one costs a size lookup and one ranged read (which holds all of a small file).
_REMOTE_HEAD_BYTES = 1 << 16


class SafetensorsFile(Mapping[str, np.ndarray]):
    """The tensors of one .safetensors file, each read when it is looked up.

        weights = safetensors_io.SafetensorsFile("gs://b/model/model.safetensors")
        embed = weights["model.embed_tokens.weight"]   # one ranged read of its bytes

    Opening reads and checks the header only. A local file is memory-mapped (values are
    read-only views; copy what must outlive the object). A remote file (gs://) is read tensor
    by tensor with byte-range requests, so a loader that converts one tensor at a time never
    holds the raw bytes of the whole file; each lookup reads again (keep what you reuse). A
    remote file of at most 64 KiB is read whole when opened.

    Raises (on opening):
      FileNotFoundError: If there is no file at `path`.
      ValueError: For a malformed or truncated file, or an unsupported dtype.
    """

    def __init__(self, path: paths.PathLike):
        self.path = paths.resolve(path)
        where = str(path)
        total = paths.size(self.path)
        head = paths.read_range(self.path, 0, min(total, _REMOTE_HEAD_BYTES))
        size = _header_size(head[:8], total, where)
        if 8 + size > len(head):
            head += paths.read_range(self.path, len(head), 8 + size)
        header = _parse_header(head[8 : 8 + size], where)
        self._offset = 8 + size
        self._entries = _checked_entries(header, total - self._offset, where)
        self._data = None
        if paths.is_remote(self.path) and len(head) == total:  # A small file: all read.
            self._data = np.frombuffer(head, np.uint8, offset=self._offset)
        elif not paths.is_remote(self.path):
            end = max((e[3] for e in self._entries.values()), default=0)
            self._data = (
                np.memmap(self.path, np.uint8, mode="r", offset=self._offset, shape=(end,))
                if end
                else np.zeros(0, np.uint8)
            )

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if self._data is not None:
            return _view(entry, self._data)
        dtype, shape, start, stop = entry
        raw = paths.read_range(self.path, self._offset + start, self._offset + stop)
        if len(raw) != stop - start:  # The object changed (was cut) since the header was read.
            raise ValueError(
                f"{self.path} is truncated: tensor {name!r} needs {stop - start} bytes, "
                f"{len(raw)} were read; re-export or re-download the file."
            )
        return np.frombuffer(raw, dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, without reading it."""
        return self._entries[name][1]


def read(path: paths.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of one .safetensors file.

    Local files are memory-mapped (read-only views; copy what must outlive the file); remote
    files (gs://) are read whole in one request, which suits small files (SAEs, factors). For
    a large remote file read tensor by tensor with `SafetensorsFile`.

    Raises:
      FileNotFoundError: If there is no file at `path`.
      ValueError: For a malformed or truncated file, or an unsupported dtype.
    """
    if not paths.is_remote(path):
        return dict(SafetensorsFile(path))
    where = str(path)
    blob = paths.read_bytes(path)
    size = _header_size(blob[:8], len(blob), where)
    header = _parse_header(blob[8 : 8 + size], where)
    data = np.frombuffer(blob, np.uint8, offset=8 + size)
    return {name: _view(e, data) for name, e in _checked_entries(header, data.size, where).items()}


def serialize(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of a .safetensors file of {name: array} (metadata format 'pt', as HF expects)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        # Little-endian, C order, shape kept (np.ascontiguousarray turns a scalar into [1]).
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        array = array.reshape(np.shape(tensors[name]))
        if array.dtype not in NAMES:
            raise ValueError(f"Tensor {name!r} has dtype {array.dtype}, not storable.")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # Keep the data 8-byte aligned, as the reference writer does.
    return b"".join([struct.pack("<Q", len(blob)), blob] + [a.tobytes() for a in arrays])


def write(path: paths.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes {name: array} as one .safetensors file, atomically (local or gs://)."""
    paths.write_bytes(path, serialize(tensors))
