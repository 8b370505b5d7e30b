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

Resuming (`write_cache(..., resume=True)`): while a cache is written, `metadata.json` also
holds a progress record, rewritten every `commit_seconds` only after the array writes it
covers have finished: how many input items (harvest batches) are wholly written, their rows,
and the running sums of squared norms the input scale is computed from. A writer stopped
anywhere (SIGKILL, a crash, a preemption) leaves a cache that is still incomplete; a rerun
with the same settings continues from the next input item and ends with the same files an
uninterrupted run writes (the rows are the same, so are the chunks; the sums are added in
the same order). SIGTERM or SIGINT while writing commits the progress at the next item
boundary and raises `interp.preemption.Preempted`.

Integrity (version 2): every chunk is stored with a crc32c checksum (zarr3's `crc32c` codec),
which tensorstore checks on every read, and a missing chunk is an error rather than zeros
(`fill_missing_data_reads: false`). A changed, truncated or missing chunk file raises
`CorruptCacheError` naming the site, the chunk, its rows and the fix, so an SAE never trains
on damaged activations. Version-1 caches (no checksums) still read, with a warning.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from absl import logging

from interp import paths, preemption
from interp.data.activations import Batch, sum_squared_norms, unit_norm_scale

FORMAT = "interp.activations"
VERSION = 2  # 2: chunks carry crc32c checksums.
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class CorruptCacheError(RuntimeError):
    """A chunk of an activation cache is damaged or missing (its checksum or size is wrong),
    or its metadata.json does not parse."""


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
    if result.state != "value":
        return None
    try:
        return json.loads(result.value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCacheError(
            f"The activation cache at {path} is damaged: its {METADATA} is not valid JSON "
            f"({e}). Re-harvest it: delete the cache (the SAE job then harvests it again)."
        ) from e


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed metadata.json at `path`, of a complete or an incomplete cache (see
    `progress`); None when there is none."""
    return _read_metadata(path)


def progress(path: str | os.PathLike) -> dict[str, Any] | None:
    """The progress record of a cache being written (or whose writer stopped) at `path`.

    Returns:
      {'items': input items wholly written, 'rows': their rows, 'sites', 'dims',
      'chunk_rows', 'squared_norms': {site: sum over those rows}}; None when `path` holds no
      cache, a complete one, or one with nothing committed yet.
    """
    metadata = _read_metadata(path)
    if not metadata or metadata.get("format") != FORMAT or metadata.get("complete"):
        return None
    return metadata.get("progress")


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
    activations: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    sites: Sequence[str] | None = None,
    num_rows: int | None = None,
    *,
    dtype: Any = "bfloat16",
    chunk_rows: int | None = None,
    model_config: Any = None,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    commit_seconds: float = 60.0,
    on_rows: Callable[[int], Any] | None = None,
) -> ActivationCache:
    """Writes a stream of activation rows to an on-disk cache, one zarr array per site.

    Consumes `activations` until `num_rows` rows are written (then stops pulling, so no
    forward pass is wasted) or the stream ends (the arrays are then trimmed to what came).
    Rows are written in whole chunks, several in flight at once. Each site's mean squared
    norm is measured on the stored (cast) values and saved with its unit-norm scale.

    With `resume`, the write can be interrupted and continued (module docstring): progress
    is committed every `commit_seconds` and on SIGTERM/SIGINT, and a call finding an
    incomplete cache written with the same settings (dtype, model, `extra`, sites,
    `num_rows`, chunk rows) continues it from the next input item. `activations` is then a
    function of the first input item to produce, so the items already written are never
    computed again: `lambda start: harvest(model, params, token_batches[start:], ...)`. The
    items must be the same on every call (a deterministic stream): put whatever decides
    them (data, seed, batch size) in `extra`, so a cache of another stream is not continued.

    Args:
      path: Local directory or gs://bucket/prefix.
      activations: Iterable of {site: [n, D]}, e.g. `harvest(...)`; with `resume`, a
        function `start -> iterable` of the items from index `start` on.
      sites: Which keys to store; default all keys of the first item.
      num_rows: Stop after this many rows; None means the whole stream.
      dtype: Storage dtype ('bfloat16' halves the bytes; activations are consumed in bf16 or
        float32 anyway).
      chunk_rows: R, rows per chunk (and per read in `batches`); default ~32 MiB per chunk.
      model_config: The model's config; stored with its hash so a sweep can check it reads
        activations of the model it thinks.
      model_name: A name for the model (checkpoint path, HF id).
      extra: More JSON-able facts to store (harvest settings: bos_id, sites' layer, corpus).
      overwrite: Replace an existing cache at `path` (with `resume`: one that cannot be
        continued); otherwise that is an error.
      resume: Commit progress as it goes, stop cleanly on SIGTERM/SIGINT, and continue an
        incomplete cache of the same settings.
      commit_seconds: With `resume`, seconds between progress commits (each also writes the
        partly filled chunk of every site once; 0 commits after every item).
      on_rows: Called with the rows written so far (a continued cache's included) after
        each item, e.g. to log a progress line.

    Returns:
      The written cache, open for reading.

    Raises:
      FileExistsError: `path` already has a cache (with `resume`: one that is complete or
        written with other settings) and `overwrite` is False.
      ValueError: the stream is empty or lacks a site, or a continued stream's items do not
        fit the cache.
      TypeError: `resume` with an iterable instead of a function of the start item.
      preemption.Preempted: with `resume`, on SIGTERM/SIGINT, once the progress is committed.
    """
    if resume and not callable(activations):
        raise TypeError(
            "write_cache(resume=True) needs `activations` as a function of the first input "
            "item to produce (start -> iterable), so a continued write skips the items "
            "already written without computing them; got an iterable."
        )
    dtype = np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "num_rows": 0,
        "requested_rows": num_rows,
        "dtype": dtype.name,
        "model": {
            "name": model_name,
            "config": None if model_config is None else _jsonable_config(model_config),
            "config_hash": None if model_config is None else config_hash(model_config),
        },
        "extra": json.loads(json.dumps(dict(extra or {}), default=str)),
        "sites": {},
    }
    existing = _read_metadata(path)
    committed = None
    if existing is not None:
        reason = _why_not_continued(existing, metadata, sites, chunk_rows) if resume else None
        if resume and reason is None:
            committed = existing["progress"]
        elif not overwrite:
            raise FileExistsError(
                f"{path} already holds an activation cache"
                + (f" that cannot be continued ({reason})" if resume else "")
                + " (overwrite=True?)."
            )
        elif resume:
            logging.info("Not continuing the activation cache at %s: %s.", path, reason)

    # Only with `resume`: without it a stop would lose the work it was meant to keep. Entered
    # before the first item is pulled: producing it may take a compilation.
    catcher = preemption.Preemption() if resume else contextlib.nullcontext()
    with catcher as preempt:
        start = 0 if committed is None else int(committed["items"])
        stream = iter(activations(start) if callable(activations) else activations)
        first = next(stream, None)
        if committed is None:
            metadata["progress"] = None
            _write_metadata(path, metadata)  # First: an overwritten cache stops being complete.
            if first is None:
                raise ValueError("The activation stream is empty; nothing to cache.")
            sites = list(first) if sites is None else list(sites)
            dims = {site: _width(first, site) for site in sites}
            if chunk_rows is None:
                chunk_rows = _default_chunk_rows(max(dims.values()), dtype.itemsize)
        else:
            metadata = existing
            sites, dims = list(committed["sites"]), dict(committed["dims"])
            chunk_rows = int(committed["chunk_rows"])
            got = dims if first is None else {site: _width(first, site) for site in sites}
            if got != dims:
                raise ValueError(
                    f"The continued stream's rows do not fit the cache at {path} (widths "
                    f"{got}, cached {dims}): it is not the stream the cache was started with."
                )
            logging.info(
                "Continuing the activation cache at %s after %d rows (%d input items).",
                path, committed["rows"], start,
            )  # fmt: skip

        writer = _CacheWriter(path, dims, dtype, chunk_rows, num_rows, committed)
        items, last_commit = start, time.monotonic()

        def commit():
            record = writer.commit(items)
            record.update(sites=sites, dims=dims, chunk_rows=chunk_rows)
            _write_metadata(path, dict(metadata, progress=record))
            logging.info(
                "Harvest progress: %d of %s rows committed to %s.",
                record["rows"], "?" if num_rows is None else num_rows, path,
            )  # fmt: skip

        for item in itertools.chain([] if first is None else [first], stream):
            if writer.full:
                break
            writer.add(item)
            items += 1
            if writer.full:  # Stop pulling: no forward pass is wasted.
                break
            if on_rows is not None:
                on_rows(writer.rows)  # E.g. a progress line with rows/s and ETA.
            # The item count is the sync id: it grows, and is the same on every process
            # that writes in step (interp/preemption.py).
            if preempt is not None and preempt.reached(items):
                commit()
                raise preempt.stop(writer.rows, num_rows, "The harvest", unit="row")
            if resume and time.monotonic() - last_commit >= commit_seconds:
                commit()
                last_commit = time.monotonic()
        written = writer.finish()
        if num_rows is not None and written < num_rows:
            logging.warning("The stream ended after %d of %d rows.", written, num_rows)

        # A complete cache has no progress to continue from.
        metadata = {key: value for key, value in metadata.items() if key != "progress"}
        metadata["num_rows"] = written
        metadata["chunk_rows"] = chunk_rows
        metadata["sites"] = writer.site_metadata()
        metadata["complete"] = True
        _write_metadata(path, metadata)  # Last: now the cache counts as written.
        # A notice during the last item or the final writes: stop here, the cache complete,
        # rather than let the caller go on with the notice taken.
        if preempt is not None and preempt.reached(items + 1):
            raise preempt.stop(written, num_rows, "The harvest", unit="row")
    return ActivationCache.open(path)


def _width(item: Batch, site: str) -> int:
    """D of a site's rows in a stream item (a missing site is an error naming the others)."""
    if site not in item:
        raise ValueError(f"Site {site!r} is not in the stream (it has {sorted(item)}).")
    return int(np.prod(np.shape(item[site])[1:]))


def _why_not_continued(existing, metadata, sites, chunk_rows) -> str | None:
    """Why the cache described by `existing` cannot be continued by a write described by the
    other arguments (None: it can)."""
    if existing.get("format") != FORMAT:
        return f"its {METADATA} is not an activation cache's"
    if existing.get("complete"):
        return "it is complete"
    record = existing.get("progress")
    if not record:
        return "nothing of it was committed"
    for key in ("version", "dtype", "model", "extra", "requested_rows"):
        if existing.get(key) != metadata[key]:
            return f"its {key} was {existing.get(key)!r}, now {metadata[key]!r}"
    if sites is not None and list(sites) != list(record["sites"]):
        return f"its sites were {record['sites']}, now {list(sites)}"
    if chunk_rows is not None and chunk_rows != record["chunk_rows"]:
        return f"its chunk_rows was {record['chunk_rows']}, now {chunk_rows}"
    return None


class _CacheWriter:
    """Streams rows into one zarr array per site, in whole chunks, a few chunks in flight.

    `add` stages an item's rows and writes every chunk they complete; `commit` also writes
    the staged rows of the partly filled chunk and waits for every write, so all rows added
    so far are durable; `finish` does the same and trims the arrays to the rows written. The
    arrays start at `num_rows` rows, or 16 chunks when the length is unknown, and grow
    geometrically. Given a committed record, it reopens the arrays and goes on from there:
    its next write completes the chunk the commit left partly filled (tensorstore reads and
    rewrites it), so every chunk ends with the rows an uninterrupted write gives it.
    """

    def __init__(
        self,
        path,
        dims: Mapping[str, int],
        dtype: np.dtype,
        chunk_rows: int,
        num_rows: int | None,
        committed: Mapping[str, Any] | None = None,
    ):
        self._sites = list(dims)
        self._dims = dict(dims)
        self._dtype = dtype
        self._chunk_rows = chunk_rows
        self._num_rows = num_rows
        self._staged: dict[str, list[np.ndarray]] = {site: [] for site in self._sites}
        self._staged_rows = 0
        self._in_flight: collections.deque = collections.deque()
        if committed is None:
            self._capacity = num_rows if num_rows is not None else 16 * chunk_rows
            self._arrays = {site: self._create(path, site) for site in self._sites}
            self._squared_norms = dict.fromkeys(self._sites, 0.0)  # float64 sums.
            self._written = 0
        else:
            self._arrays = {
                site: ts.open(_array_spec(path, site), open=True).result() for site in self._sites
            }
            self._capacity = min(int(a.domain.exclusive_max[0]) for a in self._arrays.values())
            # Exactly the sums of the committed rows (JSON keeps a float64 exactly), added to
            # in the same order as in an uninterrupted write.
            self._squared_norms = {site: float(committed["squared_norms"][site]) for site in dims}
            self._written = int(committed["rows"])

    @property
    def rows(self) -> int:
        """Rows added so far (written or staged)."""
        return self._written + self._staged_rows

    def commit(self, items: int) -> dict[str, Any]:
        """Writes every staged row, waits for all writes; returns the progress record of the
        `items` input items added so far (all their rows now durable)."""
        self._flush(final=True)
        while self._in_flight:
            self._in_flight.popleft().result()
        return {"items": items, "rows": self._written, "squared_norms": dict(self._squared_norms)}

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
        while self._in_flight:
            self._in_flight.popleft().result()
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
        """Starts the writes of the staged rows up to the last chunk they complete (of all
        staged rows if `final`). After a commit the first write starts inside a chunk."""
        staged, start = self._staged_rows, self._written
        end = start + staged if final else (start + staged) // self._chunk_rows * self._chunk_rows
        rows = end - start
        if rows <= 0:
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
                "writer stopped before finishing. Rerun the harvest to continue it (the SAE "
                "job does; write_cache(resume=True)), or rewrite it with overwrite=True."
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
