"""Safetensors files, read and written here directly, local or remote (gs://).

    tensors = safetensors_io.read("/ckpt/model.safetensors")   # {name: array}, memory-mapped
    safetensors_io.write("gs://b/sae/sae_weights.safetensors", tensors)

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian bytes. Reading it ourselves makes bfloat16
and the float8 types work with any safetensors / NumPy version, and lets large local shards be
memory-mapped instead of read whole. Both the model folders (`interp.models`) and the SAE
folders (`interp.sae.io`) use this one module.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
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


def _views(header: Mapping[str, Any], data: np.ndarray, where: str) -> dict[str, np.ndarray]:
    out = {}
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
        if stop > data.size:
            raise ValueError(
                f"{where} is truncated: tensor {name!r} ends at byte {stop} of the data, which "
                f"holds {data.size}; re-export or re-download the file."
            )
        out[name] = data[start:stop].view(dtype).reshape(info["shape"])
    return out


def read(path: paths.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of one .safetensors file.

    Local files are memory-mapped (read-only views; copy what must outlive the file); remote
    files (gs://) are read whole.

    Raises:
      FileNotFoundError: If there is no file at `path`.
      ValueError: For a malformed or truncated file, or an unsupported dtype.
    """
    where = str(path)
    if paths.is_remote(path):
        blob = paths.read_bytes(path)
        size = _header_size(blob[:8], len(blob), where)
        header = _parse_header(blob[8 : 8 + size], where)
        return _views(header, np.frombuffer(blob, np.uint8, offset=8 + size), where)
    local = paths.resolve(path)
    with open(local, "rb") as f:
        f.seek(0, io.SEEK_END)
        total = f.tell()
        f.seek(0)
        size = _header_size(f.read(8), total, where)
        header = _parse_header(f.read(size), where)
        available = total - 8 - size
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if end > available:
        raise ValueError(
            f"{where} is truncated: its header needs {end} data bytes, the file holds "
            f"{available}; re-export or re-download the file."
        )
    data = (
        np.memmap(local, np.uint8, mode="r", offset=8 + size, shape=(end,))
        if end
        else np.zeros(0, np.uint8)
    )
    return _views(header, data, where)


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
