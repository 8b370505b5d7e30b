"""The on-disk activation cache: local and gs:// round trips, atomicity, shuffled reads."""

import itertools
import os
import pathlib
import signal

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec

from interp import parallel, paths, preemption
from interp.data import activations
from interp.data import cache as cache_lib
from tests.data import testing
from tests.data.testing import BOS, CONFIG, SITES, random_tokens


@pytest.fixture(scope="module")
def model_and_params():
    return testing.model_and_params()


def _synthetic_stream(num_items=7, rows_per_item=13, dims=(8, 6), seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(num_items):
        yield {
            f"site_{i}": 3 * rng.normal(size=(rows_per_item, d)).astype(np.float32)
            for i, d in enumerate(dims)
        }


def _concat(stream):
    items = list(stream)
    return {key: np.concatenate([item[key] for item in items]) for key in items[0]}


def test_an_all_zero_site_has_no_input_scale_and_says_so(tmp_path):
    stream = ({"live": np.ones((8, 4), np.float32), "dead": np.zeros((8, 4), np.float32)}
              for _ in range(3))  # fmt: skip
    cache = cache_lib.write_cache(tmp_path / "cache", stream)
    assert cache.input_scale("live") == pytest.approx(0.5)  # ||1_4|| = 2.
    with pytest.raises(ValueError, match="'dead'.* is zero"):
        cache.input_scale("dead")
    # And after reopening: the metadata does not claim a scale of 1.
    with pytest.raises(ValueError, match="harvest another"):
        cache_lib.ActivationCache.open(tmp_path / "cache").input_scale("dead")


@pytest.mark.parametrize("num_rows,chunk_rows", [(None, 4), (70, 16)])  # Grows; trims.
def test_cache_round_trip_local(tmp_path, num_rows, chunk_rows):
    source = _concat(_synthetic_stream())  # 91 rows.
    path = tmp_path / "cache"
    cache_lib.write_cache(
        path,
        _synthetic_stream(),
        num_rows=num_rows,
        chunk_rows=chunk_rows,
        model_name="toy",
        model_config=CONFIG,
        extra={"bos_id": BOS},
    )
    expected_rows = 91 if num_rows is None else 70
    cache = cache_lib.ActivationCache.open(path)
    assert cache_lib.is_complete(path)
    assert cache.num_rows == expected_rows
    assert cache.sites == ["site_0", "site_1"]
    assert cache.dims == {"site_0": 8, "site_1": 6}
    assert cache.dtype == ml_dtypes.bfloat16
    assert cache.metadata["model"]["config_hash"] == cache_lib.config_hash(CONFIG)
    assert cache.metadata["extra"] == {"bos_id": BOS}
    for site in cache.sites:
        stored = source[site][:expected_rows].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(cache.read(site), stored)
        np.testing.assert_array_equal(cache.read(site, 10, 40), stored[10:40])
        msn = activations.mean_squared_norm(stored.astype(np.float32))
        assert cache.mean_squared_norm(site) == pytest.approx(msn, rel=1e-9)
        assert cache.input_scale(site) == pytest.approx(1 / np.sqrt(msn))
        scaled = stored.astype(np.float32) * cache.input_scale(site)
        assert activations.mean_squared_norm(scaled) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="different widths"):
        _ = cache.d


def test_cache_round_trip_gcs(gcs_bucket):
    path = f"{gcs_bucket}/runs/acts"
    source = _concat(_synthetic_stream(num_items=3, dims=(8,)))
    cache = cache_lib.write_cache(path, _synthetic_stream(num_items=3, dims=(8,)), chunk_rows=8)
    cache = cache_lib.ActivationCache.open(path)
    assert cache.num_rows == 39 and cache.d == 8
    np.testing.assert_array_equal(cache.read("site_0"), source["site_0"].astype(ml_dtypes.bfloat16))
    batch = next(cache.batches("site_0", 16, seed=0))
    assert batch.shape == (16, 8)
    with pytest.raises(FileExistsError):
        cache_lib.write_cache(path, _synthetic_stream(dims=(8,)))


def test_partially_written_cache_is_not_complete(tmp_path):
    def dying_stream():
        yield from itertools.islice(_synthetic_stream(), 3)
        raise RuntimeError("harvest died")

    path = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="harvest died"):
        cache_lib.write_cache(path, dying_stream(), chunk_rows=8)
    assert not cache_lib.is_complete(path)
    with pytest.raises(ValueError, match="incomplete"):
        cache_lib.ActivationCache.open(path)
    with pytest.raises(FileNotFoundError):
        cache_lib.ActivationCache.open(tmp_path / "nothing")

    # Overwriting a complete cache marks it incomplete before touching its arrays.
    cache_lib.write_cache(path, _synthetic_stream(), chunk_rows=8, overwrite=True)
    assert cache_lib.is_complete(path)
    with pytest.raises(RuntimeError):
        cache_lib.write_cache(path, dying_stream(), chunk_rows=8, overwrite=True)
    assert not cache_lib.is_complete(path)


class _Source:
    """A deterministic stream as `write_cache(resume=True)` takes it: `source(start)` yields
    the items from `start` on. Records each start; raises at item `die` (a crash) or sends
    this process SIGTERM while producing item `signal_at` (a preemption notice)."""

    def __init__(self, die=None, signal_at=None):
        self.items = list(_synthetic_stream())  # 7 items of 13 rows.
        self.die, self.signal_at, self.starts = die, signal_at, []

    def __call__(self, start):
        self.starts.append(start)
        for index in range(start, len(self.items)):
            if index == self.die:
                raise RuntimeError("harvest died")
            if index == self.signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # Handled: the write stops after it.
            yield self.items[index]


def _objects(path) -> dict[str, bytes]:
    """Every object (file) of a cache, local or gs://, as bytes."""
    store = ts.KvStore.open(paths.kvstore(path)).result()
    return {key.decode(): store.read(key).result().value for key in store.list().result()}


# Arrays that grow (length unknown) or are trimmed (the stream is longer), locally and on gs://.
@pytest.mark.parametrize("where,num_rows", [("local", None), ("local", 70), ("gs", 70)])
def test_a_stopped_write_continues_to_the_files_of_one_write(tmp_path, where, num_rows, request):
    base = str(tmp_path)
    if where == "gs":
        base = f"{request.getfixturevalue('gcs_bucket')}/run"
    options = dict(num_rows=num_rows, chunk_rows=16, extra={"corpus": "toy"})
    want = cache_lib.write_cache(f"{base}/want", _synthetic_stream(), **options)
    path, total = f"{base}/cache", "" if num_rows is None else f" of {num_rows}"
    resumable = dict(options, resume=True, commit_seconds=0)  # A commit after every item.

    # A crash while item 4 is computed: items 0-3 are committed, the cache is incomplete.
    with pytest.raises(RuntimeError, match="harvest died"):
        cache_lib.write_cache(path, _Source(die=4), **resumable)
    assert cache_lib.progress(path)["items"] == 4 and cache_lib.progress(path)["rows"] == 52
    assert not cache_lib.is_complete(path)
    with pytest.raises(ValueError, match="incomplete"):
        cache_lib.ActivationCache.open(path)

    # Continued; SIGTERM while item 4 is computed: it is written and committed, then the stop.
    handler = signal.getsignal(signal.SIGTERM)
    source = _Source(signal_at=4)
    with pytest.raises(preemption.Preempted) as stopped:
        cache_lib.write_cache(path, source, **resumable)
    assert source.starts == [4]  # Items 0-3 were not computed again.
    assert stopped.value.exit_code == 143
    assert str(stopped.value) == (
        f"The harvest preempted (SIGTERM) at row 65{total}; rerun the same command to resume."
    )
    assert cache_lib.progress(path)["rows"] == 65 and not cache_lib.is_complete(path)
    assert signal.getsignal(signal.SIGTERM) is handler  # Restored.

    # Continued to the end: the same files as one uninterrupted write, bit for bit.
    source = _Source()
    cache = cache_lib.write_cache(path, source, **resumable)
    assert source.starts == [5]
    assert _objects(path) == _objects(f"{base}/want")
    assert cache.metadata == want.metadata and cache_lib.progress(path) is None


def test_a_notice_during_the_last_item_stops_after_the_cache_is_complete(tmp_path):
    path = tmp_path / "cache"
    with pytest.raises(preemption.Preempted, match="at row 70 of 70"):
        cache_lib.write_cache(path, _Source(signal_at=5), num_rows=70, resume=True)
    assert cache_lib.is_complete(path)  # A rerun reuses it.


def test_a_stopped_write_of_other_settings_is_not_continued(tmp_path):
    path = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="harvest died"):
        cache_lib.write_cache(path, _Source(die=3), extra={"corpus": "a"}, resume=True,
                              commit_seconds=0)  # fmt: skip
    other = dict(extra={"corpus": "b"}, resume=True)
    with pytest.raises(FileExistsError, match=r"cannot be continued \(its extra was"):
        cache_lib.write_cache(path, _Source(), **other)
    source = _Source()
    cache = cache_lib.write_cache(path, source, overwrite=True, **other)
    assert source.starts == [0] and cache.num_rows == 91
    with pytest.raises(FileExistsError, match="it is complete"):
        cache_lib.write_cache(path, _Source(), **other)
    with pytest.raises(TypeError, match="function of the first input item"):
        cache_lib.write_cache(tmp_path / "new", _synthetic_stream(), resume=True)


def test_harvest_into_cache(tmp_path, model_and_params):
    model, params = model_and_params
    token_batches = [random_tokens(seed) for seed in range(4)]
    for tokens in token_batches:
        tokens[:, 0] = BOS
    stream = activations.harvest(model, params, token_batches, SITES, bos_id=BOS)
    direct = _concat(activations.harvest(model, params, token_batches, SITES, bos_id=BOS))
    cache = cache_lib.write_cache(tmp_path / "c", stream, SITES, num_rows=50, chunk_rows=16)
    assert cache.num_rows == 50 and cache.d == CONFIG.d_model and cache.sites == SITES
    for site in SITES:
        np.testing.assert_array_equal(
            cache.read(site), direct[site][:50].astype(ml_dtypes.bfloat16)
        )


@pytest.fixture
def row_id_cache(tmp_path):
    """200 rows whose values are their row index (float32 keeps them exact)."""
    rows = np.arange(200, dtype=np.float32)
    stream = (
        {"a": np.stack([rows[i : i + 30]] * 4, 1), "b": -rows[i : i + 30, None]}
        for i in range(0, 200, 30)
    )
    return cache_lib.write_cache(tmp_path / "ids", stream, dtype="float32", chunk_rows=16)


def test_batches_shuffle_within_epoch_and_resume(row_id_cache):
    cache = row_id_cache
    steps_per_epoch = cache.steps_per_epoch(24)  # 8, 8 rows skipped per epoch.
    assert steps_per_epoch == 8
    full = list(
        cache.batches(["a", "b"], 24, seed=3, num_steps=20, window_chunks=3, return_indices=True)
    )
    for batch, indices in full:
        np.testing.assert_array_equal(batch["a"][:, 0], indices)
        np.testing.assert_array_equal(batch["b"][:, 0], -indices)  # Sites aligned.
    epoch0 = np.concatenate([indices for _, indices in full[:8]])
    assert len(np.unique(epoch0)) == 192  # No row twice within an epoch.
    assert len(np.unique(full[0][1] // 16)) >= 2  # A batch mixes several chunks.
    epoch1 = np.concatenate([indices for _, indices in full[8:16]])
    assert not np.array_equal(epoch0, epoch1)  # A fresh order each epoch.

    options = dict(seed=3, window_chunks=3, return_indices=True)
    resumed = list(cache.batches(["a", "b"], 24, start_step=7, num_steps=13, **options))
    assert len(resumed) == 13
    for (want, want_indices), (got, got_indices) in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(got_indices, want_indices)
        np.testing.assert_array_equal(got["a"], want["a"])
    other_seed = next(cache.batches("a", 24, seed=4, window_chunks=3))
    assert not np.array_equal(other_seed, full[0][0]["a"])


@pytest.mark.parametrize(
    "mesh_shape,spec", [((8, 1), PartitionSpec("data")), ((4, 2), PartitionSpec("data", "model"))]
)
def test_read_sharded(row_id_cache, monkeypatch, mesh_shape, spec):
    cache = row_id_cache
    mesh = parallel.make_mesh(data=mesh_shape[0], model=mesh_shape[1])
    sharding = NamedSharding(mesh, spec)
    reads = []
    original = cache.read
    monkeypatch.setattr(cache, "read", lambda *args: reads.append(args[1:3]) or original(*args))

    array = cache.read_sharded("a", slice(8, 56), sharding)

    assert isinstance(array, jax.Array) and array.shape == (48, 4)
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), cache.read("a", 8, 56))
    # Every read covers one device's 6 rows, never the whole range.
    assert reads and all(stop - start == 48 // mesh_shape[0] for start, stop in reads[:-1])
    for shard in array.addressable_shards:
        rows = np.asarray(shard.data)[:, 0]
        np.testing.assert_array_equal(rows, np.arange(8, 56)[shard.index[0]])


def _chunk_file(cache_path, site: str, chunk: int) -> pathlib.Path:
    return pathlib.Path(cache_path) / cache_lib.ARRAYS / site / "c" / str(chunk) / "0"


@pytest.mark.parametrize("damage", ["changed", "truncated", "missing"])
def test_a_damaged_chunk_is_an_error_naming_it_never_data(tmp_path, damage):
    path = tmp_path / "cache"
    cache_lib.write_cache(path, _synthetic_stream(), chunk_rows=16)  # 91 rows: 6 chunks.
    chunk = _chunk_file(path, "site_1", 2)
    data = chunk.read_bytes()
    if damage == "changed":
        chunk.write_bytes(data[:40] + bytes([data[40] ^ 0x01]) + data[41:])
    elif damage == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        chunk.unlink()
    cache = cache_lib.ActivationCache.open(path)
    assert cache.read("site_1", 0, 32).shape == (32, 6)  # Chunks 0-1 are intact.
    expected = r"reading rows \[32, 48\) of 'site_1' \(chunk 2, 16 rows each\) failed.*Re-harvest"
    with pytest.raises(cache_lib.CorruptCacheError, match=expected):
        cache.read("site_1", 32, 48)
    with pytest.raises(cache_lib.CorruptCacheError, match="of 'site_1' \\(chunk 2"):
        for _ in cache.batches(["site_0", "site_1"], batch_size=8, num_steps=12):
            pass  # An epoch of shuffled batches reads every chunk.


def test_a_damaged_metadata_file_is_an_error_naming_the_cache(tmp_path):
    path = tmp_path / "cache"
    cache_lib.write_cache(path, _synthetic_stream(), chunk_rows=16)
    metadata = path / cache_lib.METADATA
    metadata.write_bytes(metadata.read_bytes()[:300])  # Cut short: not JSON.
    for read in (cache_lib.is_complete, cache_lib.read_metadata, cache_lib.ActivationCache.open):
        with pytest.raises(cache_lib.CorruptCacheError, match=r"cache.*metadata.json is not valid"):
            read(path)
