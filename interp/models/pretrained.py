"""Hugging Face model folders: read and write them (config.json, safetensors, tokenizer).

    model, params, tokenizer = from_pretrained("/ckpt/pythia-70m")   # a local HF folder
    save_pretrained("/out/pythia-70m", model, params, tokenizer)      # loads in transformers too

Safetensors files are read and written here directly (an 8-byte header length, a JSON header,
raw little-endian bytes), so bfloat16 works with any safetensors/NumPy version and large shards
are memory-mapped instead of read whole. The name maps are in `convert.py`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from interp.models.config import ModelConfig
from interp.models.convert import config_from_hf, config_to_hf, hf_to_params, params_to_hf
from interp.models.transformer import Transformer

_DTYPES = {
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
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{name: array} of one .safetensors file, memory-mapped (read-only views)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    data = (
        np.memmap(path, np.uint8, mode="r", offset=8 + size, shape=(end,))
        if end
        else np.zeros(0, np.uint8)
    )
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"Tensor {name!r} in {path} has unsupported dtype {info['dtype']}.")
        start, stop = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = data[start:stop].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes {name: array} as one .safetensors file (metadata format 'pt', as HF expects)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"Tensor {name!r} has dtype {array.dtype}, not storable.")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # Keep the data 8-byte aligned, as the reference writer does.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())


def _read_weights(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"No weights in {folder}: expected model.safetensors, or shards "
            "model-0000X-of-0000Y.safetensors with model.safetensors.index.json (PyTorch .bin "
            "files are not read; re-save them with safe_serialization=True)."
        )
    tensors, source = {}, {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"Shard {folder / name} listed in {index} is missing.")
        for key, value in read_safetensors(folder / name).items():
            tensors[key], source[key] = value, str(folder / name)
    return tensors, source


def _load_tokenizer(folder: pathlib.Path):
    try:
        from interp.models import tokenizer as tokenizer_lib
    except ModuleNotFoundError as error:  # Not written yet in this checkout.
        if error.name != "interp.models.tokenizer":
            raise
        return None
    return tokenizer_lib.load(folder)


def from_pretrained(
    path: str | pathlib.Path, dtype: Any = None, param_dtype: Any = None
) -> tuple[Transformer, dict[str, Any], Any]:
    """Loads a local Hugging Face model folder.

    Args:
      path: Folder with config.json and model.safetensors (or sharded safetensors with
        model.safetensors.index.json), and optionally tokenizer.json.
      dtype: Compute dtype (default float32); also the storage dtype unless param_dtype is
        given.
      param_dtype: Storage dtype of the parameters.

    Returns:
      (Transformer, params as jax arrays, tokenizer or None).

    Raises:
      FileNotFoundError: naming the missing folder, config.json or weights.
      ValueError: for an unsupported model or weights that do not match config.json.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder {folder} does not exist; expected a Hugging Face folder with "
            "config.json and model.safetensors."
        )
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing; expected a Hugging Face config.")
    config = config_from_hf(json.loads(config_file.read_text()))
    compute = jnp.dtype(dtype or "float32").name
    storage = jnp.dtype(param_dtype).name if param_dtype is not None else compute
    config = config.replace(dtype=compute, param_dtype=storage)
    tensors, source = _read_weights(folder)
    params = jax.device_put(hf_to_params(tensors, config, source=source))
    return Transformer(config), params, _load_tokenizer(folder)


def save_pretrained(
    path: str | pathlib.Path,
    model_or_config: Transformer | ModelConfig,
    params: Mapping[str, Any],
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes a Hugging Face folder that `from_pretrained` and transformers both load.

    Args:
      path: Output folder; replaced atomically if it exists.
      model_or_config: The `Transformer` or its `ModelConfig`.
      params: Its parameters; saved in their own dtype.
      tokenizer: Optional; its `save(path)` is called, and its bos/eos/pad ids go into
        config.json.
      max_shard_bytes: Split weights into model-0000X-of-0000Y.safetensors shards of at most
        this size (a larger single tensor gets a shard of its own) plus an index.
    """
    config = getattr(model_or_config, "config", model_or_config)
    hf_config = config_to_hf(config)
    for role in ("bos", "eos", "pad"):  # None unless the tokenizer knows them.
        hf_config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id", None)
    tensors = params_to_hf(params, config)
    dtypes = {_NAMES.get(t.dtype) for t in tensors.values()}
    if len(dtypes) == 1 and (name := _TORCH_NAMES.get(dtypes.pop())):
        hf_config["dtype"] = name
    # Written to a sibling folder, then swapped in: an interrupted export never leaves a mix of
    # old and new files, and the previous export survives until the new one is complete.
    folder = pathlib.Path(path)
    if folder.exists():
        others = sorted(p.name for p in folder.iterdir() if not _is_model_file(p.name))
        if others:
            raise FileExistsError(
                f"save_pretrained replaces the whole folder {folder}, which also holds "
                f"{others[:5]}; save into an empty folder or one holding only a model."
            )
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        _write_folder(staging, hf_config, tensors, tokenizer, max_shard_bytes)
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, retired)
            os.rename(staging, folder)
            shutil.rmtree(retired)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
}


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or (name.startswith("model") and name.endswith(".safetensors"))


def _write_folder(folder, hf_config, tensors, tokenizer, max_shard_bytes) -> None:
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(folder / "model.safetensors", tensors)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, tensor in tensors.items():
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / file, shard)
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(folder))
