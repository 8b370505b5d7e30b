"""An on-disk activation cache: tensorstore zarr arrays, local or gs://, read back sharded.

    cache = cache_lib.write_cache("gs://b/acts", activations.harvest(...), sites,
                                  num_rows=2**24, model_config=config, model_name="demo")
    cache = cache_lib.ActivationCache.open("gs://b/acts")
    for batch in cache.batches(sites, batch_size=4096, seed=0, start_step=step): ...
    x = cache.read_sharded(sites[0], slice(0, 2**16), NamedSharding(mesh, P("data")))
    scale = cache.input_scale(sites[0])             # SAEConfig.input_scale

Legend: D activation width, R rows per on-disk chunk.

On-disk layout (`write_cache`), one directory or gs:// prefix:

    metadata.json                  sites, widths, num_rows, dtype, model identity, scaling
    arrays/blocks_3.resid_post/    zarr v3 array [num_rows, D], chunks [R, D]
    arrays/blocks_3.mlp.out/       ...

`metadata.json` is written first with `"complete": false` and rewritten with
`"complete": true` only after every array write has finished, so a reader (`open`,
`is_complete`) never takes a cache that is being (or was partly) written for a finished one.
A single object write is atomic on GCS, and tensorstore's file kvstore writes through a
temporary file and a rename. One process writes a cache; any number read it.

Integrity (version 2): every chunk is stored with a crc32c checksum (zarr3's `crc32c` codec),
which tensorstore checks on every read, and a missing chunk is an error rather than zeros
(`fill_missing_data_reads: false`). A changed, truncated or missing chunk file raises
`CorruptCacheError` naming the site, the chunk, its rows and the fix, so an SAE never trains
on damaged activations. Version-1 caches (no checksums) still read, with a warning.
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

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from absl import logging

from interp import paths
from interp.data.activations import Batch, sum_squared_norms, unit_norm_scale

FORMAT = "interp.activations"
VERSION = 2  # 2: chunks carry crc32c checksums.
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class CorruptCacheError(RuntimeError):
    """A chunk of an activation cache is damaged or missing (its checksum or size is wrong)."""


METADATA = "metadata.json"
ARRAYS = "arrays"


def _kvstore(path: str | os.PathLike) -> dict[str, Any]:
    """tensorstore kvstore spec of a local directory or gs://bucket/prefix."""
    return paths.kvstore(path, "Activation caches")


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

    writer = _CacheWriter(path, dims, dtype, chunk_rows, num_rows)
    for item in itertools.chain([first], stream):
        writer.add(item)
        if writer.full:  # Stop pulling: no forward pass is wasted.
            break
    written = writer.finish()
    if num_rows is not None and written < num_rows:
        logging.warning("The stream ended after %d of %d rows.", written, num_rows)

    metadata["num_rows"] = written
    metadata["chunk_rows"] = chunk_rows
    metadata["sites"] = writer.site_metadata()
    metadata["complete"] = True
    _write_metadata(path, metadata)  # Last: now the cache counts as written.
    return ActivationCache.open(path)


class _CacheWriter:
    """Streams rows into one zarr array per site, in whole chunks, a few chunks in flight.

    `add` stages an item's rows and writes every chunk they complete; `finish` writes the
    partial last chunk, waits for all writes and trims the arrays to the rows written. The
    arrays start at `num_rows` rows, or 16 chunks when the length is unknown, and grow
    geometrically.
    """

    def __init__(
        self, path, dims: Mapping[str, int], dtype: np.dtype, chunk_rows: int, num_rows: int | None
    ):
        self._sites = list(dims)
        self._dims = dict(dims)
        self._dtype = dtype
        self._chunk_rows = chunk_rows
        self._num_rows = num_rows
        self._capacity = num_rows if num_rows is not None else 16 * chunk_rows
        self._arrays = {site: self._create(path, site) for site in self._sites}
        self._squared_norms = dict.fromkeys(self._sites, 0.0)  # float64 sums.
        self._staged: dict[str, list[np.ndarray]] = {site: [] for site in self._sites}
        self._staged_rows = 0
        self._written = 0
        self._in_flight: collections.deque = collections.deque()

    def _create(self, path, site: str) -> ts.TensorStore:
        """A new (or replacing) zarr array [capacity, D] of the site, chunked [R, D]."""
        d = self._dims[site]
        return ts.open(
            dict(_array_spec(path, site), metadata={"codecs": _CODECS}),
            create=True,
            delete_existing=True,
            dtype=ts.dtype(self._dtype.name),
            shape=[self._capacity, d],
            chunk_layout=ts.ChunkLayout(write_chunk_shape=[self._chunk_rows, d]),
            fill_value=0,
        ).result()

    @property
    def full(self) -> bool:
        """Whether `num_rows` rows are written or staged."""
        return self._num_rows is not None and self._written + self._staged_rows >= self._num_rows

    def add(self, item: Batch) -> None:
        """Stages the item's rows (up to `num_rows` in all) and writes the chunks they fill."""
        first = self._sites[0]
        n = len(item[first])
        if self._num_rows is not None:
            n = min(n, self._num_rows - self._written - self._staged_rows)
        for site in self._sites:
            if len(item[site]) != len(item[first]):
                raise ValueError(f"Sites {site!r} and {first!r} have different row counts.")
            rows = np.asarray(item[site])[:n].reshape(n, self._dims[site]).astype(self._dtype)
            self._squared_norms[site] += sum_squared_norms(rows)
            self._staged[site].append(rows)
        self._staged_rows += n
        self._flush(final=False)

    def finish(self) -> int:
        """Writes what is staged, waits for every write, trims; returns the rows written."""
        self._flush(final=True)
        for future in self._in_flight:
            future.result()
        if self._written == 0:
            raise ValueError("The activation stream had no rows; nothing to cache.")
        if self._written != self._capacity:
            # Only metadata changes: no chunk beyond the rows written exists.
            for site, array in self._arrays.items():
                array.resize(
                    exclusive_max=[self._written, self._dims[site]],
                    resize_metadata_only=True,
                    shrink_only=True,
                ).result()
        return self._written

    def site_metadata(self) -> dict[str, dict[str, Any]]:
        """{site: its metadata.json entry}, once `finish` has run."""
        out = {}
        for site in self._sites:
            msn = self._squared_norms[site] / self._written
            out[site] = {
                "array": _array_key(site).rstrip("/"),
                "d": self._dims[site],
                "mean_squared_norm": msn,
                # None: an all-zero site has no unit-norm scale (`input_scale` says so).
                "input_scale": unit_norm_scale(msn) if msn > 0 else None,
            }
        return out

    def _flush(self, final: bool) -> None:
        """Starts the writes of the staged whole chunks (of all staged rows if `final`)."""
        staged = self._staged_rows
        rows = staged if final else (staged // self._chunk_rows) * self._chunk_rows
        if rows == 0:
            return
        if self._written + rows > self._capacity:
            self._grow(self._written + rows)
        start = self._written
        for site in self._sites:
            block = np.concatenate(self._staged[site])
            write = self._arrays[site][start : start + rows].write(block[:rows])
            self._in_flight.append(write)
            self._staged[site] = [block[rows:]] if rows < len(block) else []
        self._written += rows
        self._staged_rows -= rows
        while len(self._in_flight) > 4 * len(self._sites):  # Bound memory; a few in flight.
            self._in_flight.popleft().result()

    def _grow(self, rows: int) -> None:
        """Resizes the arrays to hold at least `rows` rows, at least doubling them."""
        self._capacity = max(2 * self._capacity, rows)
        self._arrays = {
            site: array.resize(
                exclusive_max=[self._capacity, self._dims[site]], expand_only=True
            ).result()
            for site, array in self._arrays.items()
        }


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
        if metadata.get("version", 1) < 2:
            logging.warning(
                "The activation cache at %s has no chunk checksums (written by an older "
                "interp): damaged chunks would go unnoticed. Re-harvest it to get them.",
                path,
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
        """Factor giving the site's rows unit mean squared norm (`SAEConfig.input_scale`).

        Raises:
          ValueError: If every cached row of the site is zero: no scale gives it unit norm,
            and an SAE on it would learn nothing.
        """
        scale = self.metadata["sites"][self._check(site)]["input_scale"]
        if scale is None:
            raise ValueError(
                f"Every cached activation at {site!r} in {self.path} is zero (mean squared "
                "norm 0), so there is no input scale and nothing for an SAE to learn. Check "
                "the hook site (a site after an ablation or of an unused module?) and "
                "harvest another one."
            )
        return float(scale)

    def _check(self, site: str) -> str:
        if site not in self.dims:
            raise KeyError(f"Site {site!r} is not in this cache; it has {self.sites}.")
        return site

    def array(self, site: str) -> ts.TensorStore:
        """The site's tensorstore array [num_rows, D] (opened once; a missing chunk reads
        as an error, not as zeros)."""
        if site not in self._arrays:
            spec = dict(_array_spec(self.path, self._check(site)), fill_missing_data_reads=False)
            self._arrays[site] = ts.open(spec, open=True, read=True).result()
        return self._arrays[site]

    def _result(self, site: str, start: int, stop: int, future) -> np.ndarray:
        """A read's result; a damaged chunk raises `CorruptCacheError` saying which and why."""
        try:
            return future.result()
        except ValueError as e:
            first, last = start // self.chunk_rows, (max(stop, start + 1) - 1) // self.chunk_rows
            chunks = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise CorruptCacheError(
                f"The activation cache at {self.path} is damaged: reading rows [{start}, "
                f"{stop}) of {site!r} ({chunks}, {self.chunk_rows} rows each) failed: "
                f"{str(e).splitlines()[0]}. Re-harvest it: delete the cache (the SAE job "
                "then harvests it again), or write it anew with write_cache(overwrite=True)."
            ) from e

    def read(
        self, site: str, start: int = 0, stop: int | None = None, columns: slice = slice(None)
    ) -> np.ndarray:
        """Rows [start, stop) of a site (and optionally a slice of columns): [n, D] stored dtype."""
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"Rows [{start}, {stop}) outside [0, {self.num_rows}).")
        return self._result(site, start, stop, self.array(site)[start:stop, columns].read())

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
            ranges = [(c * chunk, min((c + 1) * chunk, self._cache.num_rows)) for c in chunks]
            futures = [array[lo:hi].read() for lo, hi in ranges]
            data[site] = np.concatenate(
                [self._cache._result(site, *r, f) for r, f in zip(ranges, futures, strict=True)]
            )
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
