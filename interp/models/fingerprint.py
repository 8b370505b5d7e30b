"""A model's identity: a short hash of its config and parameters.

Artefacts computed from a model (activation caches, and EK-FAC factors) record it, so that
reusing one with another model (a retrained LM with the same config, a different checkpoint)
is an error instead of silently wrong results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interp import parallel
from interp.models.config import ModelConfig

# Elements hashed per parameter array: all of a smaller array, else this many evenly spaced.
SAMPLE_SIZE = 1 << 16


@functools.partial(jax.jit, static_argnums=1)
def _strided(x: jax.Array, stride: int) -> jax.Array:
    # One compilation per (shape, dtype, sharding): a model's layers share a handful.
    return x.reshape(-1)[::stride][:SAMPLE_SIZE]


def _sample(leaf: Any) -> np.ndarray:
    """Up to SAMPLE_SIZE evenly spaced elements of `leaf`, exactly (no arithmetic on them)."""
    size = int(np.prod(np.shape(leaf)))
    stride = max(1, size // SAMPLE_SIZE)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(parallel.process_allgather(_strided(leaf, stride)))
    if isinstance(leaf, jax.Array) and size <= SAMPLE_SIZE:
        return np.asarray(leaf).reshape(-1)  # Small: the whole array, no compilation.
    if isinstance(leaf, jax.Array):
        return np.asarray(_strided(leaf, stride))
    return np.asarray(leaf).reshape(-1)[::stride][:SAMPLE_SIZE]


def fingerprint(config: Any, params: Any) -> str:
    """16 hex digits identifying a model: sha256 of its config and parameter samples.

    The config (a `ModelConfig`, as a dataclass or a dict, or another mapping) is hashed
    except its compute/storage dtypes and the fields at their defaults; every parameter
    contributes its path, shape and the values (as float32 for floating types, so a bf16
    checkpoint loaded in f32 keeps its hash) of up to `SAMPLE_SIZE` evenly spaced elements, so
    any retraining or other checkpoint changes the hash while the cost stays small for
    billion-parameter models. Independent of how params are sharded.

    Args:
      config: The model's config.
      params: Its parameter tree (NumPy or jax arrays, sharded or not).

    Returns:
      A 16-character hex string.
    """
    if not dataclasses.is_dataclass(config):
        try:  # A ModelConfig as a dict (e.g. from a saved record) hashes as the dataclass.
            config = ModelConfig.from_dict(config)
        except (TypeError, ValueError):
            pass  # Another mapping: hashed whole.
    if dataclasses.is_dataclass(config):
        # Fields at their default are left out, so a field added to the config class later
        # (with a default that keeps the old behaviour) leaves saved fingerprints valid.
        values = {
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(config)
            if field.default is dataclasses.MISSING or getattr(config, field.name) != field.default
        }
        values = json.loads(json.dumps(values, default=str))
    else:
        values = dict(config)
    for field in ("dtype", "param_dtype"):
        values.pop(field, None)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sample = _sample(leaf)
        if jnp.issubdtype(sample.dtype, jnp.floating):  # bf16 values hash as their f32 selves.
            sample = sample.astype(np.float32)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{np.shape(leaf)}{sample.dtype}".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]
