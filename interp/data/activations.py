"""Activations for SAE training: harvest them at hook points, shuffle them, cache them on disk.

    sites = ["blocks_3/resid_post", "blocks_3/mlp/out"]
    stream = activations.harvest(model, params, token_batches, sites, bos_id=tok.bos_id)
    # Straight into training, mixed across sequences:
    buffer = activations.ShuffleBuffer(stream, capacity=2**18, seed=0)
    batch = buffer.get(4096)                        # {site: [4096, D]}
    # Or once to disk (local or gs://), then many SAE sweeps read it back:
    cache = activations.write_cache("gs://b/acts", stream, sites, num_rows=2**24,
                                    model_config=config, model_name="demo")
    cache = activations.ActivationCache.open("gs://b/acts")
    for batch in cache.batches(sites, batch_size=4096, seed=0, start_step=step): ...
    x = cache.read_sharded(sites[0], slice(0, 2**16), NamedSharding(mesh, P("data")))
    scale = cache.input_scale(sites[0])             # SAEConfig.input_scale

Legend: B batch, T positions, D activation width, N kept rows (tokens), C buffer capacity,
R rows per on-disk chunk.

Which positions are kept. Padding (mask 0) is never a real token. The BOS token (and, with
`skip_first`, the first real position of every row) is dropped as well: its residual stream
is an attention sink whose norm is often tens of times that of other tokens and nearly constant
across sequences, so a handful of such rows dominate an SAE's reconstruction loss and its
input scaling while carrying no information. All sites of one harvest keep the same
positions, so row i of every site is the same token.

Why shuffle. Consecutive tokens of one sequence have strongly correlated activations (the
residual stream changes slowly along a sequence, and a document's topic persists), so an SAE
trained on batches of whole sequences sees a handful of contexts per step: gradients are
biased, latents specialise to recent documents and die or over-fire (SAELens and sparsify
both shuffle through a large token buffer for this reason). `ShuffleBuffer` mixes the live
stream; the cache's `batches` mixes on read.

On-disk layout (`write_cache`), one directory or gs:// prefix:

    metadata.json                  sites, widths, num_rows, dtype, model identity, scaling
    arrays/blocks_3.resid_post/    zarr v3 array [num_rows, D], chunks [R, D]
    arrays/blocks_3.mlp.out/       ...

`metadata.json` is written first with `"complete": false` and rewritten with
`"complete": true` only after every array write has finished, so a reader (`open`,
`is_complete`) never takes a cache that is being (or was partly) written for a finished one.
A single object write is atomic on GCS, and tensorstore's file kvstore writes through a
temporary file and a rename. One process writes a cache; any number read it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts
from absl import logging

from interp import parallel
from interp.models import hooks

FORMAT = "interp.activations"
VERSION = 1
METADATA = "metadata.json"
ARRAYS = "arrays"

Batch = Mapping[str, np.ndarray]

# ----------------------------------------------------------------------------- harvesting


def keep_mask(
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    bos_id: int | None = None,
    skip_first: bool = False,
) -> np.ndarray:
    """Which positions `harvest` keeps: real tokens that are neither BOS nor (optionally) first.

    Args:
      tokens: [B, T] int token ids.
      attention_mask: [B, T], 1 for real tokens, 0 for padding; None means all real.
      bos_id: Drop every position holding this token (packed rows may hold several).
      skip_first: Drop each row's first real token (position 0 in the model's counting, so
        the first non-padding column under left padding). For models that always attend from
        position 0 like a BOS even without one.

    Returns:
      bool [B, T].
    """
    tokens = np.asarray(tokens)
    real = (
        np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    )
    keep = real.copy()
    if bos_id is not None:
        keep &= tokens != bos_id
    if skip_first:
        keep &= np.cumsum(real, axis=1) > 1
    return keep


def _split_item(item, pad_id):
    """A stream item (tokens, (tokens, mask) or {'tokens', 'attention_mask'}) -> (tokens, mask)."""
    if isinstance(item, Mapping):
        tokens = item["tokens"]
        mask = item.get("attention_mask", item.get("mask"))
    elif isinstance(item, tuple):
        tokens, mask = item
    else:
        tokens, mask = item, None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"Token batches must be [B, T]; got shape {tokens.shape}.")
    if mask is None:
        mask = np.ones(tokens.shape, np.int32) if pad_id is None else tokens != pad_id
    mask = np.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match tokens {tokens.shape}.")
    return tokens.astype(np.int32), mask.astype(np.int32)


def harvest(
    model: nn.Module,
    params: Any,
    token_batches: Iterable[Any],
    sites: str | Sequence[str],
    *,
    bos_id: int | None = None,
    pad_id: int | None = None,
    skip_first: bool = False,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
) -> Iterator[dict[str, np.ndarray]]:
    """Runs the model over token batches and yields the activations of the kept positions.

    The forward pass is one jitted `hooks.run_with_hooks` (compiled once per batch shape);
    only the captured sites are outputs, so XLA drops the layers after the last site and the
    unembedding. Rows are in row-major (batch, position) order of the kept positions.

    Args:
      model: A `Transformer` (any module with `HookPoint`s).
      params: Its parameters.
      token_batches: Iterable of [B, T] int arrays, of (tokens, attention_mask) pairs, or of
        {'tokens': ..., 'attention_mask': ...} dicts. The mask also goes to the model, so
        padded keys are not attended to.
      sites: Hook names or patterns (`blocks_*/resid_post`); each site's value must be
        [B, T, ...] (trailing dims are flattened, so `attn/z` gives [N, heads * head_dim]).
      bos_id: Drop positions holding this token (see the module docstring for why).
      pad_id: For items without a mask: positions holding this token are padding. Ignored
        when a mask is given (so an eos used as padding is not dropped inside real text).
      skip_first: Also drop each row's first real position.
      dtype: Dtype of the yielded rows (cast on device, before the transfer).
      mesh: Optional mesh: the forward pass runs with params and batches sharded by `rules`
        (`parallel.sharded_jit`); results are gathered to every process.
      rules: Logical-axis rules for `mesh`.

    Yields:
      {site: [N, D] of `dtype`}, one dict per token batch; N = `keep_mask(...).sum()`.
    """
    names = hooks.resolve(model, [sites] if isinstance(sites, str) else list(sites))

    def run(params, tokens, mask):
        _, acts = hooks.run_with_hooks(model, params, tokens, capture=names, attention_mask=mask)
        return {name: acts[name].astype(dtype) for name in names}

    if mesh is None:
        forward = jax.jit(run)
    else:
        shardings = parallel.param_shardings(model, mesh, rules)
        forward = parallel.sharded_jit(run, mesh, rules, params_sharding=shardings)

    def rows(tokens, keep, acts):
        acts = parallel.process_allgather(acts) if mesh is not None else jax.device_get(acts)
        out = {}
        for name in names:
            value = np.asarray(acts[name])
            if value.shape[:2] != tokens.shape:
                raise ValueError(
                    f"Site {name!r} has shape {value.shape}, not [B, T, ...] with [B, T] = "
                    f"{tokens.shape}; it cannot be harvested per token."
                )
            out[name] = value.reshape(*tokens.shape, -1)[keep]  # [N, D]
        return out

    pending = None  # The previous batch: its transfer waits until the next one is dispatched.
    for item in token_batches:
        tokens, mask = _split_item(item, pad_id)
        keep = keep_mask(tokens, mask, bos_id=bos_id, skip_first=skip_first)
        acts = forward(params, tokens, mask)  # Asynchronous dispatch.
        if pending is not None:
            yield rows(*pending)
        pending = (tokens, keep, acts)
    if pending is not None:
        yield rows(*pending)


# ----------------------------------------------------------------------------- scaling


def _sum_squared_norms(x: np.ndarray) -> float:
    """Sum over rows of squared L2 norms: per row in float32, across rows in float64."""
    x = np.asarray(x)
    x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    return float(np.einsum("nd,nd->n", x, x).sum(dtype=np.float64))


def mean_squared_norm(x: np.ndarray | jax.Array) -> float:
    """Mean over rows of the squared L2 norm (rows in float32, the mean in float64). x: [N, D]."""
    return _sum_squared_norms(x) / max(1, int(np.prod(np.shape(x)[:-1])))


def unit_norm_scale(mean_sq_norm: float) -> float:
    """The factor s with E[||s x||^2] = 1: 1 / sqrt(mean squared norm).

    Scaling SAE inputs to unit mean squared norm makes one L1 coefficient / learning rate
    work across layers and models (Anthropic's April 2024 update scales to sqrt(D) instead,
    a constant factor away). The SAE keeps it as `SAEConfig.input_scale`.
    """
    if not mean_sq_norm > 0:
        raise ValueError(f"mean squared norm must be positive, got {mean_sq_norm}.")
    return float(1.0 / math.sqrt(mean_sq_norm))


# ----------------------------------------------------------------------------- shuffling


class ShuffleBuffer:
    """Mixes activation rows from many sequences before they reach the SAE.

    Holds up to `capacity` rows of every key (sites, or anything else row-aligned such as
    token ids), in aligned arrays. `get(B)` first refills the buffer to capacity from the
    stream whenever it is less than `min_fill` full (at the first call too), then draws B
    rows uniformly at random without replacement and removes them; rows from the end fill
    the holes. So every streamed row is returned at most once (exactly once if the stream is
    drained), and each batch is a random sample of at least `min_fill * capacity` rows taken
    from the C / T most recent sequences: the SAELens / sparsify pattern (see the module
    docstring for why it matters). Given the seed and the stream, the output is
    deterministic.

    When the stream ends, the buffer is drained; `get` raises StopIteration once fewer than
    B rows remain (those are dropped). `iterate(B)` is the same as a generator.
    """

    def __init__(
        self,
        source: Iterable[Batch],
        capacity: int,
        *,
        seed: int = 0,
        min_fill: float = 0.5,
    ):
        """Wraps a stream.

        Args:
          source: Iterable of {key: [n, ...]} with the same keys (and trailing shapes) in every
            item, e.g. `harvest(...)`. Items of any size (also larger than capacity) work.
          capacity: C, rows held.
          seed: Seed of the draws.
          min_fill: Refill when fewer than this fraction of C rows remain, in (0, 1].
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}.")
        if not 0 < min_fill <= 1:
            raise ValueError(f"min_fill must be in (0, 1], got {min_fill}.")
        self.capacity = capacity
        self.min_fill = min_fill
        self._source = iter(source)
        self._rng = np.random.default_rng(seed)
        self._storage: dict[str, np.ndarray] | None = None
        self._count = 0
        self._pending: dict[str, np.ndarray] | None = None  # Rows taken but not yet stored.
        self._exhausted = False

    def __len__(self) -> int:
        """Rows in the buffer now."""
        return self._count

    def _next_item(self) -> dict[str, np.ndarray] | None:
        try:
            item = {key: np.asarray(value) for key, value in next(self._source).items()}
        except StopIteration:
            self._exhausted = True
            return None
        sizes = {len(value) for value in item.values()}
        if len(sizes) != 1:
            raise ValueError(f"Stream item has keys of different row counts: {sizes}.")
        if self._storage is None:
            self._storage = {
                key: np.empty((self.capacity, *value.shape[1:]), value.dtype)
                for key, value in item.items()
            }
        elif item.keys() != self._storage.keys():
            raise ValueError(f"Stream keys changed: {sorted(self._storage)} -> {sorted(item)}.")
        return item

    def _fill(self) -> None:
        while self._count < self.capacity:
            if self._pending is None:
                self._pending = self._next_item()
                if self._pending is None:
                    return
            n = len(next(iter(self._pending.values())))
            take = min(n, self.capacity - self._count)
            for key, value in self._pending.items():
                self._storage[key][self._count : self._count + take] = value[:take]
            self._count += take
            self._pending = None if take == n else {k: v[take:] for k, v in self._pending.items()}

    def get(self, batch_size: int) -> dict[str, np.ndarray]:
        """A random batch {key: [batch_size, ...]}; raises StopIteration when drained."""
        if not 1 <= batch_size <= self.capacity:
            raise ValueError(f"batch_size must be in [1, capacity={self.capacity}].")
        if not self._exhausted and self._count < max(batch_size, self.min_fill * self.capacity):
            self._fill()
        if self._count < batch_size:
            raise StopIteration
        count, remaining = self._count, self._count - batch_size
        chosen = self._rng.choice(count, batch_size, replace=False)
        holes = chosen[chosen < remaining]  # Freed slots below the new end ...
        movers = np.setdiff1d(np.arange(remaining, count), chosen, assume_unique=True)  # ... fed
        out = {}
        for key, storage in self._storage.items():
            out[key] = storage[chosen]
            storage[holes] = storage[movers]
        self._count = remaining
        return out

    def iterate(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """`get(batch_size)` until the stream and buffer are drained."""
        while True:
            try:
                yield self.get(batch_size)
            except StopIteration:
                return


# ----------------------------------------------------------------------------- storage


def _kvstore(path: str | os.PathLike) -> dict[str, Any]:
    """tensorstore kvstore spec of a local directory or gs://bucket/prefix."""
    path = os.fspath(path)
    if path.startswith("gs://"):
        bucket, _, prefix = path[len("gs://") :].partition("/")
        prefix = prefix.strip("/")
        return {"driver": "gcs", "bucket": bucket, "path": prefix + "/" if prefix else ""}
    if "://" in path:
        raise ValueError(f"Activation caches live on local disk or gs://; got {path!r}.")
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _array_key(site: str) -> str:
    # Hook names have '/' (which would nest arrays inside each other's folders) but no '.'.
    return f"{ARRAYS}/{site.replace('/', '.')}/"


def _array_spec(path, site: str) -> dict[str, Any]:
    kvstore = _kvstore(path)
    return {"driver": "zarr3", "kvstore": dict(kvstore, path=kvstore["path"] + _array_key(site))}


def _read_metadata(path) -> dict[str, Any] | None:
    result = ts.KvStore.open(_kvstore(path)).result().read(METADATA).result()
    return json.loads(result.value) if result.state == "value" else None


def _write_metadata(path, metadata: Mapping[str, Any]) -> None:
    store = ts.KvStore.open(_kvstore(path)).result()
    store.write(METADATA, json.dumps(metadata, indent=1).encode()).result()


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished cache (all arrays written, metadata marked complete)."""
    metadata = _read_metadata(path)
    return bool(metadata and metadata.get("format") == FORMAT and metadata.get("complete"))


def _default_chunk_rows(d: int, itemsize: int) -> int:
    """Rows of ~32 MiB chunks (big GCS objects, few requests), a power of two in [1024, 65536]."""
    rows = 2 ** int(math.log2(max(1, (32 << 20) // (d * itemsize))))
    return int(min(65536, max(1024, rows)))


def config_hash(config: Any) -> str:
    """Short sha256 of a model config (ModelConfig, dict or ConfigDict), stable across runs."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_cache(
    path: str | os.PathLike,
    activations: Iterable[Batch],
    sites: Sequence[str] | None = None,
    num_rows: int | None = None,
    *,
    dtype: Any = "bfloat16",
    chunk_rows: int | None = None,
    model_config: Any = None,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> ActivationCache:
    """Writes a stream of activation rows to an on-disk cache, one zarr array per site.

    Consumes `activations` until `num_rows` rows are written (then stops pulling, so no
    forward pass is wasted) or the stream ends (the arrays are then trimmed to what came).
    Rows are written in whole chunks, several in flight at once. Each site's mean squared
    norm is measured on the stored (cast) values and saved with its unit-norm scale.

    Args:
      path: Local directory or gs://bucket/prefix.
      activations: Iterable of {site: [n, D]}, e.g. `harvest(...)`.
      sites: Which keys to store; default all keys of the first item.
      num_rows: Stop after this many rows; None means the whole stream.
      dtype: Storage dtype ('bfloat16' halves the bytes; activations are consumed in bf16 or
        float32 anyway).
      chunk_rows: R, rows per chunk (and per read in `batches`); default ~32 MiB per chunk.
      model_config: The model's config; stored with its hash so a sweep can check it reads
        activations of the model it thinks.
      model_name: A name for the model (checkpoint path, HF id).
      extra: More JSON-able facts to store (harvest settings: bos_id, sites' layer, corpus).
      overwrite: Replace an existing cache at `path`; otherwise that is an error.

    Returns:
      The written cache, open for reading.

    Raises:
      FileExistsError: `path` already has a cache and `overwrite` is False.
      ValueError: the stream is empty or lacks a site.
    """
    if _read_metadata(path) is not None and not overwrite:
        raise FileExistsError(f"{path} already holds an activation cache (overwrite=True?).")
    dtype = np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "num_rows": 0,
        "dtype": dtype.name,
        "model": {
            "name": model_name,
            "config": None if model_config is None else _jsonable_config(model_config),
            "config_hash": None if model_config is None else config_hash(model_config),
        },
        "extra": dict(extra or {}),
        "sites": {},
    }
    _write_metadata(path, metadata)  # First: an overwritten cache stops counting as complete.

    stream = iter(activations)
    first = next(stream, None)
    if first is None:
        raise ValueError("The activation stream is empty; nothing to cache.")
    sites = list(first) if sites is None else list(sites)
    missing = [site for site in sites if site not in first]
    if missing:
        raise ValueError(f"Sites {missing} are not in the stream (it has {sorted(first)}).")
    dims = {site: int(np.prod(np.shape(first[site])[1:])) for site in sites}
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(max(dims.values()), dtype.itemsize)
    capacity = num_rows if num_rows is not None else 16 * chunk_rows
    arrays = {
        site: ts.open(
            _array_spec(path, site),
            create=True,
            delete_existing=True,
            dtype=ts.dtype(dtype.name),
            shape=[capacity, dims[site]],
            chunk_layout=ts.ChunkLayout(write_chunk_shape=[chunk_rows, dims[site]]),
            fill_value=0,
        ).result()
        for site in sites
    }

    squared_norms = dict.fromkeys(sites, 0.0)  # float64 sums.
    staged: dict[str, list[np.ndarray]] = {site: [] for site in sites}
    staged_rows = written = 0
    in_flight: collections.deque = collections.deque()

    def flush(final: bool) -> None:
        nonlocal staged_rows, written, capacity, arrays
        rows = staged_rows if final else (staged_rows // chunk_rows) * chunk_rows
        if rows == 0:
            return
        if written + rows > capacity:  # Unknown length: grow geometrically.
            capacity = max(2 * capacity, written + rows)
            arrays = {
                site: array.resize(exclusive_max=[capacity, dims[site]], expand_only=True).result()
                for site, array in arrays.items()
            }
        for site in sites:
            block = np.concatenate(staged[site])
            in_flight.append(arrays[site][written : written + rows].write(block[:rows]))
            staged[site] = [block[rows:]] if rows < len(block) else []
        written += rows
        staged_rows -= rows
        while len(in_flight) > 4 * len(sites):  # Bound memory; keep a few chunks in flight.
            in_flight.popleft().result()

    item = first
    while item is not None:
        n = len(item[sites[0]])
        if num_rows is not None:
            n = min(n, num_rows - written - staged_rows)
        for site in sites:
            if len(item[site]) != len(item[sites[0]]):
                raise ValueError(f"Sites {site!r} and {sites[0]!r} have different row counts.")
            rows = np.asarray(item[site])[:n].reshape(n, dims[site]).astype(dtype)
            squared_norms[site] += _sum_squared_norms(rows)
            staged[site].append(rows)
        staged_rows += n
        flush(final=False)
        if num_rows is not None and written + staged_rows >= num_rows:
            break
        item = next(stream, None)
    flush(final=True)
    for future in in_flight:
        future.result()
    if written == 0:
        raise ValueError("The activation stream had no rows; nothing to cache.")
    if written != capacity:  # Trim: only metadata changes, no chunk beyond `written` exists.
        for site, array in arrays.items():
            array.resize(
                exclusive_max=[written, dims[site]], resize_metadata_only=True, shrink_only=True
            ).result()
    if num_rows is not None and written < num_rows:
        logging.warning("The stream ended after %d of %d rows.", written, num_rows)

    metadata["num_rows"] = written
    metadata["chunk_rows"] = chunk_rows
    for site in sites:
        msn = squared_norms[site] / written
        metadata["sites"][site] = {
            "array": _array_key(site).rstrip("/"),
            "d": dims[site],
            "mean_squared_norm": msn,
            "input_scale": unit_norm_scale(msn) if msn > 0 else 1.0,
        }
    metadata["complete"] = True
    _write_metadata(path, metadata)  # Last: now the cache counts as written.
    return ActivationCache.open(path)


def _jsonable_config(config: Any) -> dict[str, Any]:
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(values, default=str))


class ActivationCache:
    """A finished on-disk activation cache (see `write_cache` and the module docstring).

    Attributes:
      path: Where it lives.
      metadata: The parsed metadata.json.
      sites: Site names, in the order written.
      num_rows: Rows per site (tokens).
      dims: {site: D}.
      dtype: Stored dtype (NumPy; bfloat16 is `ml_dtypes.bfloat16`).
      chunk_rows: R.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any]):
        """Use `ActivationCache.open(path)`."""
        self.path = os.fspath(path)
        self.metadata = dict(metadata)
        self.sites = list(metadata["sites"])
        self.num_rows = int(metadata["num_rows"])
        self.dims = {site: int(info["d"]) for site, info in metadata["sites"].items()}
        name = metadata["dtype"]
        self.dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
        self.chunk_rows = int(metadata["chunk_rows"])
        self._arrays: dict[str, ts.TensorStore] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationCache:
        """Opens a finished cache.

        Raises:
          FileNotFoundError: no cache at `path`.
          ValueError: the cache is not complete (being written, or the writer died).
        """
        metadata = _read_metadata(path)
        if metadata is None or metadata.get("format") != FORMAT:
            raise FileNotFoundError(f"No activation cache at {path} (no {METADATA}).")
        if not metadata.get("complete"):
            raise ValueError(
                f"The activation cache at {path} is incomplete: it is being written, or its "
                "writer stopped before finishing. Rewrite it with overwrite=True."
            )
        return cls(path, metadata)

    def __repr__(self) -> str:
        return f"ActivationCache({self.path!r}, {self.num_rows} rows, {self.dims}, {self.dtype})"

    @property
    def d(self) -> int:
        """D, when every site has the same width (else see `dims`)."""
        widths = set(self.dims.values())
        if len(widths) != 1:
            raise ValueError(f"Sites have different widths {self.dims}; use .dims[site].")
        return widths.pop()

    def mean_squared_norm(self, site: str) -> float:
        """Mean squared L2 norm of the site's stored rows."""
        return float(self.metadata["sites"][self._check(site)]["mean_squared_norm"])

    def input_scale(self, site: str) -> float:
        """Factor giving the site's rows unit mean squared norm (`SAEConfig.input_scale`)."""
        return float(self.metadata["sites"][self._check(site)]["input_scale"])

    def _check(self, site: str) -> str:
        if site not in self.dims:
            raise KeyError(f"Site {site!r} is not in this cache; it has {self.sites}.")
        return site

    def array(self, site: str) -> ts.TensorStore:
        """The site's tensorstore array [num_rows, D] (opened once)."""
        if site not in self._arrays:
            spec = _array_spec(self.path, self._check(site))
            self._arrays[site] = ts.open(spec, open=True, read=True).result()
        return self._arrays[site]

    def read(
        self, site: str, start: int = 0, stop: int | None = None, columns: slice = slice(None)
    ) -> np.ndarray:
        """Rows [start, stop) of a site (and optionally a slice of columns): [n, D] stored dtype."""
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"Rows [{start}, {stop}) outside [0, {self.num_rows}).")
        return self.array(site)[start:stop, columns].read().result()

    # ----------------------------------------------------------- shuffled, resumable batches

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per pass over the rows (the last num_rows % batch_size are skipped)."""
        return self.num_rows // batch_size

    def _window_rows(self, seed: int, epoch: int, window_chunks: int) -> list[np.ndarray]:
        """Per window of epoch `epoch`: its row indices in serving order."""
        num_chunks = -(-self.num_rows // self.chunk_rows)
        order = np.random.default_rng([seed, epoch]).permutation(num_chunks)
        windows = []
        for w, start in enumerate(range(0, num_chunks, window_chunks)):
            rows = np.concatenate(
                [
                    np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.num_rows))
                    for c in order[start : start + window_chunks]
                ]
            )
            windows.append(rows[np.random.default_rng([seed, epoch, w]).permutation(len(rows))])
        return windows

    def batches(
        self,
        sites: str | Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        num_steps: int | None = None,
        window_chunks: int = 16,
        return_indices: bool = False,
    ) -> Iterator[Any]:
        """Deterministic shuffled batches, resumable at any step; endless unless `num_steps`.

        Reading random single rows from chunked storage would decode a whole chunk per row,
        so the shuffle is two-level: each epoch permutes the chunks (seeded by seed, epoch),
        groups them into windows of `window_chunks` chunks (`window_chunks * R` rows held in
        memory), and serves each window's rows in a random permutation (seeded by seed,
        epoch, window). A batch is thus a uniform sample of the `window_chunks * R / T`
        sequences of `window_chunks` random places of the cache (defaults with D = 768:
        262144 tokens, the size of a typical SAELens buffer); raise `window_chunks` for more
        mixing at `window_chunks * R * D * itemsize` bytes per site and window (two windows,
        the one served and the one read ahead, are held). Batches are
        consecutive `batch_size` slices of that epoch order (straddling windows as needed),
        the last `num_rows % batch_size` rows of an epoch are skipped, and the next window is
        read ahead while the current one is served. Batch s depends only on (seed,
        batch_size, window_chunks, s), so starting at `start_step=k` gives exactly the tail
        of an uninterrupted run. Every process that calls this gets the same batches (take
        your slice, or use `read_sharded` for one global array).

        Args:
          sites: One site (batches are arrays) or several (batches are {site: array}).
          batch_size: Rows per batch, <= num_rows.
          seed: Seed of the shuffle.
          start_step: First step to serve.
          num_steps: Steps to serve; None for endless (epoch after epoch).
          window_chunks: Chunks shuffled together in memory.
          return_indices: Also yield the cache row indices [batch_size]: (batch, indices).

        Yields:
          [batch_size, D] (stored dtype) or {site: [batch_size, D]}; with `return_indices`,
          (that, int64 [batch_size]).
        """
        names = [sites] if isinstance(sites, str) else list(sites)
        for site in names:
            self._check(site)
        steps_per_epoch = self.steps_per_epoch(batch_size)
        if batch_size < 1 or steps_per_epoch == 0:
            raise ValueError(f"batch_size must be in [1, {self.num_rows}], got {batch_size}.")
        if window_chunks < 1 or start_step < 0:
            raise ValueError("window_chunks must be >= 1 and start_step >= 0.")
        reader = _WindowReader(self, names, seed, window_chunks)
        steps = itertools.count(start_step)
        if num_steps is not None:
            steps = range(start_step, start_step + num_steps)
        for step in steps:
            epoch, index = divmod(step, steps_per_epoch)
            values, indices = reader.rows(epoch, index * batch_size, (index + 1) * batch_size)
            batch = values[names[0]] if isinstance(sites, str) else values
            yield (batch, indices) if return_indices else batch

    # ----------------------------------------------------------- sharded reads

    def read_sharded(
        self,
        site: str,
        rows: slice,
        sharding: jax.sharding.Sharding,
        dtype: Any = None,
    ) -> jax.Array:
        """Rows of a site as one global jax.Array laid out by `sharding`.

        Built with `jax.make_array_from_callback`: each addressable device's shard is read
        straight from storage, so in multi-host every process reads only the rows (and
        columns) its devices hold, and nothing passes through one host.

        Args:
          site: The site.
          rows: slice(start, stop) of rows (step 1); None ends default to the whole cache.
          sharding: Target sharding of the [stop - start, D] array.
          dtype: Convert to this dtype after reading; None keeps the stored dtype.

        Returns:
          jax.Array [stop - start, D].
        """
        start, stop, step = rows.indices(self.num_rows)
        if step != 1:
            raise ValueError(f"rows must be a contiguous slice, got step {step}.")
        shape = (max(stop - start, 0), self.dims[self._check(site)])

        def shard(index):
            lo, hi, _ = index[0].indices(shape[0])
            out = self.read(site, start + lo, start + hi, index[1])
            return out if dtype is None else out.astype(dtype)

        return jax.make_array_from_callback(shape, sharding, shard)


class _WindowReader:
    """Serves row ranges of an epoch's shuffled order, reading windows whole and ahead."""

    def __init__(self, cache: ActivationCache, sites: list[str], seed: int, window_chunks: int):
        self._cache, self._sites, self._seed = cache, sites, seed
        self._window_chunks = window_chunks
        self._epoch_windows: dict[int, list[np.ndarray]] = {}
        self._loaded: collections.OrderedDict = collections.OrderedDict()  # (epoch, w) -> data
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epoch_windows:
            if len(self._epoch_windows) > 2:
                self._epoch_windows.pop(min(self._epoch_windows))
            self._epoch_windows[epoch] = self._cache._window_rows(
                self._seed, epoch, self._window_chunks
            )
        return self._epoch_windows[epoch]

    def _load(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Reads the window's chunks whole (aligned reads, I/O only: runs in the background).

        Returns {site: the chunks' rows, chunks in ascending order} and, for each row of
        `rows` (serving order), its position in there; batches gather from it.
        """
        chunk = self._cache.chunk_rows
        chunks = np.unique(rows // chunk)
        data = {}
        for site in self._sites:
            array = self._cache.array(site)
            futures = [
                array[c * chunk : min((c + 1) * chunk, self._cache.num_rows)].read() for c in chunks
            ]
            data[site] = np.concatenate([future.result() for future in futures])
        return data, np.searchsorted(chunks, rows // chunk) * chunk + rows % chunk

    def _window(self, epoch: int, w: int):
        key = (epoch, w)
        if key not in self._loaded:
            rows = self._windows(epoch)[w]
            self._loaded[key] = self._pool.submit(self._load, rows)
        self._loaded.move_to_end(key)
        while len(self._loaded) > 2:  # The window being served and the one read ahead.
            self._loaded.popitem(last=False)
        return self._loaded[key]

    def rows(self, epoch: int, lo: int, hi: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        windows = self._windows(epoch)
        starts = np.cumsum([0] + [len(rows) for rows in windows])
        parts, indices = [], []
        w = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(starts[w + 1]))
            data, local = self._window(epoch, w).result()
            take = local[lo - starts[w] : end - starts[w]]
            parts.append({site: np.take(values, take, axis=0) for site, values in data.items()})
            indices.append(windows[w][lo - starts[w] : end - starts[w]])
            lo, w = end, w + 1
        # Read ahead: the window after the last one touched (or the next epoch's first).
        if w < len(windows):
            self._window(epoch, w)
        else:
            self._window(epoch + 1, 0)
        values = {site: np.concatenate([part[site] for part in parts]) for site in self._sites}
        return values, np.concatenate(indices)
