"""Hugging Face model folders: read and write them (config.json, safetensors, tokenizer).

    model, params, tokenizer = from_pretrained("/ckpt/pythia-70m")   # a local HF folder
    save_pretrained("gs://b/out/pythia-70m", model, params, tokenizer)  # or gs://; transformers
                                                                        # loads a local copy too

Folders are local or gs:// (`interp.paths`). Safetensors files go through
`interp.safetensors_io`: bfloat16 with any NumPy, local shards memory-mapped, remote ones read
tensor by tensor with byte-range requests, so loading never holds a whole remote shard's raw
bytes beside the parameters made from them.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from interp import paths, safetensors_io
from interp.models import gguf_io, gguf_tokenizer, hub
from interp.models import tokenizer as tokenizer_lib
from interp.models.config import ModelConfig
from interp.models.hf_config import config_from_hf, config_to_hf
from interp.models.hf_params import hf_to_params, params_to_hf
from interp.models.transformer import Transformer

_TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _read_weights(folder: epath.Path) -> tuple[Mapping[str, np.ndarray], dict[str, str]]:
    """({name: tensor}, {name: file}) of a folder's safetensors; tensors are read on lookup."""
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
    shards, source = [], {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"Shard {folder / name} listed in {index} is missing.")
        shard = safetensors_io.SafetensorsFile(folder / name)
        for key in shard:
            if key in source:
                raise ValueError(
                    f"Tensor {key!r} is in both {source[key]} and {folder / name}; "
                    f"{index.name} must list each tensor in one shard."
                )
            source[key] = str(folder / name)
        shards.append(shard)
    # Lazy: hf_to_params looks up each tensor once, so only one raw tensor is held at a time.
    return collections.ChainMap(*shards), source


def from_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    param_dtype: Any = None,
    *,
    revision: str | None = None,
) -> tuple[Transformer, dict[str, Any], Any]:
    """Loads a model: a Hugging Face folder (local or gs://), a GGUF file or a Hub id.

    Args:
      path: Local folder or URL (gs://bucket/model) with config.json and model.safetensors
        (or sharded safetensors with model.safetensors.index.json), and optionally
        tokenizer.json; or a local GGUF file (llama.cpp's format, quantized or not), or a
        folder holding one and no config.json: weights dequantized to float32 and the
        tokenizer built from the file's metadata (`interp.models.gguf_io`); or a Hugging
        Face Hub id, 'org/name' or 'hf://org/name', that is not a local path (fetched through
        huggingface_hub's cache, offline mode and HF_TOKEN; `interp.models.hub`); or
        'embedded:smollm2', the embedded SmolLM2-135M-Instruct (`interp.models.embedded`).
      dtype: Compute dtype (default float32); also the storage dtype unless param_dtype is
        given.
      param_dtype: Storage dtype of the parameters.
      revision: A Hub id's branch, tag or commit (default: its main branch); only for Hub
        ids. `hub.resolve` gives the commit a branch resolves to, for a pinned rerun.

    Returns:
      (Transformer, params as jax arrays, tokenizer or None). The tokenizer keeps the
      checkpoint's conventions as transformers reads them (the bos/eos its post-processor adds,
      padding side, pad token, chat template; see `interp.models.tokenizer.load`).

    Raises:
      FileNotFoundError: naming the missing folder, config.json (an interrupted gs://
        export leaves none) or weights.
      ValueError: for an unsupported model, weights that do not match config.json, or a
        malformed or truncated safetensors file.
      PermissionError: for a gated Hub model without a token that has access.
    """
    # Imported here: `python -m interp.models.embedded` would otherwise find it imported.
    from interp.models import embedded

    if embedded.is_embedded(path) and revision is None:
        path = embedded.resolve(path)  # Before the Hub check: 'embedded:x' is not a path.
    elif hub.is_hub_id(path):
        path = hub.resolve(os.fspath(path), revision).path
    elif revision is not None:
        raise ValueError(
            f"revision={revision!r} is for Hub ids ('org/name'); {os.fspath(path)!r} is a "
            "path (or exists locally under that name)."
        )
    if gguf_io.is_gguf(path):
        return _from_gguf(path, dtype, param_dtype)
    folder = paths.resolve(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder {folder} does not exist; expected a Hugging Face folder with "
            "config.json and model.safetensors."
        )
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{config_file} is missing; expected a Hugging Face config (save_pretrained "
            "writes it last: without it an export is incomplete)."
        )
    config = _dtypes(config_from_hf(json.loads(config_file.read_text())), dtype, param_dtype)
    tensors, source = _read_weights(folder)
    params = jax.device_put(hf_to_params(tensors, config, source=source))
    return Transformer(config), params, tokenizer_lib.load(folder)


def _dtypes(config: ModelConfig, dtype: Any, param_dtype: Any) -> ModelConfig:
    compute = jnp.dtype(dtype or "float32").name
    storage = jnp.dtype(param_dtype).name if param_dtype is not None else compute
    return config.replace(dtype=compute, param_dtype=storage)


def _from_gguf(path, dtype, param_dtype):
    """from_pretrained of a GGUF file (or a folder holding one): see `interp.models.gguf_io`."""
    hf_config, tensors, metadata = gguf_io.read(path)
    config = _dtypes(config_from_hf(hf_config), dtype, param_dtype)
    params = jax.device_put(hf_to_params(tensors, config, source=gguf_io.find(path)))
    tokenizer = None
    if "tokenizer.ggml.model" in metadata:
        tokenizer = gguf_tokenizer.tokenizer_from_gguf(metadata)
    return Transformer(config), params, tokenizer


def save_pretrained(
    path: str | os.PathLike,
    model_or_config: Transformer | ModelConfig,
    params: Mapping[str, Any],
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes a Hugging Face folder that `from_pretrained` and transformers both load.

    Args:
      path: Output folder, local or gs://. A local folder is replaced atomically (written
        beside it, then renamed). Object stores cannot rename a folder: there the old model
        files are deleted (config.json first), the new ones written, config.json last, so a
        reader sees the new export, or none, never a mix.
      model_or_config: The `Transformer` or its `ModelConfig`.
      params: Its parameters; saved in their own dtype.
      tokenizer: Optional; its `save(path)` is called, and its bos/eos/pad ids go into
        config.json.
      max_shard_bytes: Split weights into model-0000X-of-0000Y.safetensors shards of at most
        this size (a larger single tensor gets a shard of its own) plus an index.

    Raises:
      FileExistsError: if the folder holds files other than a model's.
    """
    config = getattr(model_or_config, "config", model_or_config)
    hf_config = config_to_hf(config)
    for role in ("bos", "eos", "pad"):  # None unless the tokenizer knows them.
        hf_config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id", None)
    tensors = params_to_hf(params, config)
    dtypes = {safetensors_io.NAMES.get(t.dtype) for t in tensors.values()}
    if len(dtypes) == 1 and (name := _TORCH_NAMES.get(dtypes.pop())):
        hf_config["dtype"] = name
    folder = paths.resolve(path)
    existing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    others = [name for name in existing if not _is_model_file(name)]
    if others:
        raise FileExistsError(
            f"save_pretrained replaces the whole folder {folder}, which also holds "
            f"{others[:5]}; save into an empty folder or one holding only a model."
        )
    if paths.is_remote(folder):
        # config.json goes first and comes back last: it marks a complete export.
        for name in sorted(existing, key=lambda name: name != "config.json"):
            (folder / name).unlink()
        _write_folder(folder, hf_config, tensors, tokenizer, max_shard_bytes)
        return
    # Written to a sibling folder, then swapped in: an interrupted export never leaves a mix of
    # old and new files, and the previous export survives until the new one is complete.
    local = pathlib.Path(folder)
    staging = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        _write_folder(staging, hf_config, tensors, tokenizer, max_shard_bytes)
        if local.exists():
            retired = local.with_name(f".{local.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(local, retired)
            os.rename(staging, local)
            shutil.rmtree(retired)
        else:
            os.rename(staging, local)
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
    """Writes the model files into `folder` (local or remote), config.json last."""
    folder = paths.resolve(folder)
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        safetensors_io.write(folder / "model.safetensors", tensors)
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
            safetensors_io.write(folder / file, shard)
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        paths.write_text(
            folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n"
        )
    if tokenizer is not None:
        tokenizer.save(os.fspath(folder))
    paths.write_text(folder / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
