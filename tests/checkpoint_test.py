"""Tests for interp/checkpoint.py on local disk and on gs:// (local emulator)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from interp import checkpoint


def _state(seed=0):
    """A tree with every kind of leaf a training run saves."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
        },
        "opt": {"count": np.asarray(7, np.int32), "mu": rng.normal(size=(4,))},
        "step": 120,
        "lr": 3e-4,
        "meta": {"data_step": 1200, "tokenizer": "gpt2", "finished": False},
    }


def _assert_trees_equal(got, want):
    """Same structure, same leaf types, same values and dtypes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(got),
        jax.tree.leaves(got),
        jax.tree.leaves(want),
        strict=True,
    ):
        key = jax.tree_util.keystr(path[0])
        if isinstance(b, jax.Array):
            assert isinstance(a, jax.Array), key
        else:
            assert type(a) is type(b), (key, type(a), type(b))
        if hasattr(b, "dtype"):
            assert a.dtype == b.dtype, key
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)
        else:
            assert a == b, key


def test_save_restore_roundtrip_local(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(120, state)
        ckpt.wait()
        assert ckpt.latest_step() == 120
        _assert_trees_equal(ckpt.restore(), state)
        _assert_trees_equal(ckpt.restore(120, target=state), state)
    # A fresh Checkpointer (a restarted run) sees the step.
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [120]
        _assert_trees_equal(ckpt.restore(target=state), state)


def test_save_restore_roundtrip_gcs(gcs_bucket):
    directory = f"{gcs_bucket}/run/ckpt"
    state = _state()
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.save(3, state)
        ckpt.wait()
        _assert_trees_equal(ckpt.restore(), state)
    # gs:// has no atomic rename: the step is marked done by its commit file.
    assert (epath.Path(directory) / "3" / "commit_success.txt").exists()
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 3
        _assert_trees_equal(ckpt.restore(3, target=state), state)


def test_restore_into_named_sharding(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    state = {"w": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), "v": jnp.arange(12.0)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)  # Saved from one device.
        ckpt.wait()
        shardings = {
            "w": NamedSharding(mesh, P("data", "model")),
            "v": NamedSharding(mesh, P("model")),
        }
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        restored = ckpt.restore(target=target)
        # The helper builds the same target.
        assert checkpoint.abstract_like(state, shardings) == target
    for name in state:
        assert restored[name].sharding == shardings[name]
        np.testing.assert_array_equal(restored[name], state[name])
    # Each device holds only its block: [8, 16] over (2, 4) -> [4, 4] shards.
    assert {shard.data.shape for shard in restored["w"].addressable_shards} == {(4, 4)}
    assert {shard.data.shape for shard in restored["v"].addressable_shards} == {(3,)}


def test_restore_concrete_target_takes_its_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": jnp.arange(16.0)})
        ckpt.wait()
        target = {"x": jax.device_put(jnp.zeros(16), sharding)}
        restored = ckpt.restore(target=target)
    assert restored["x"].sharding == sharding
    np.testing.assert_array_equal(restored["x"], np.arange(16.0))


def test_async_save_survives_donation(tmp_path):
    x = jnp.arange(1000.0)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": x})
        # `save` returned: the arrays may now be donated (overwritten in place).
        jax.jit(lambda y: y * 2, donate_argnums=0)(x)
        ckpt.wait()
        np.testing.assert_array_equal(ckpt.restore()["x"], np.arange(1000.0))


def test_max_to_keep_and_interval(tmp_path):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(step, {"step": step}) for step in range(6)]
        assert saved == [True, False, True, False, True, False]
        assert ckpt.save(5, {"step": 5}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.restore(4) == {"step": 4}
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_saving_an_existing_step_is_refused(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"a": 1})
        ckpt.wait()
        with pytest.raises(FileExistsError, match="Step 1 is already saved"):
            ckpt.save(1, {"a": 2}, force=True)
        assert ckpt.restore(1) == {"a": 1}


def test_interrupted_local_save_is_not_a_step(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, {"a": 2})
    # What a save killed midway leaves locally: orbax's tmp directory, never renamed.
    leftover = tmp_path / "3.orbax-checkpoint-tmp-1700000000000000"
    (leftover / "default").mkdir(parents=True)
    (leftover / "default" / "partial").write_text("x")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [2]
        assert ckpt.restore() == {"a": 2}
    assert not leftover.exists()  # cleanup_tmp_directories removed it.
    assert sorted(os.listdir(tmp_path)) == ["2"]


def test_interrupted_gcs_save_is_not_a_step(gcs_bucket):
    directory = epath.Path(gcs_bucket) / "ckpt"
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(2, {"a": 2})
    # What a save killed midway leaves on gs://: a step written in place, no commit file.
    (directory / "3" / "default").mkdir(parents=True)
    (directory / "3" / "default" / "partial").write_text("x")
    assert not (directory / "3" / "commit_success.txt").exists()
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.restore() == {"a": 2}
    assert not (directory / "3" / "default" / "partial").exists()
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(3, {"a": 3})  # The step number is free again.
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]


def test_restore_from_empty_directory_names_it(tmp_path):
    directory = tmp_path / "nothing_here"
    with checkpoint.Checkpointer(directory) as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint to restore in .*nothing_here"):
            ckpt.restore()


def test_restore_missing_step_lists_saved_steps(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, {"a": 4})
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match=r"step 5 .*finished steps: \[4\]"):
            ckpt.restore(5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        checkpoint.Checkpointer(tmp_path, max_to_keep=0)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="non-negative int"):
            ckpt.save(-1, {"a": 1})
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(1, {"a": 1})


def test_abstract_leaf_without_sharding_restores_as_numpy(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": jnp.arange(4, dtype=jnp.bfloat16), "n": 3})
        ckpt.wait()
        restored = ckpt.restore(target={"x": jax.ShapeDtypeStruct((4,), jnp.bfloat16), "n": 0})
    assert isinstance(restored["x"], np.ndarray) and restored["x"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["x"].astype(np.float32), np.arange(4.0))
    assert restored["n"] == 3


def test_relative_local_directory_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": np.arange(6.0).reshape(2, 3)}
    with checkpoint.Checkpointer("runs/relative", async_save=False) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore(1, target=checkpoint.abstract_like(state))
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (tmp_path / "runs" / "relative" / "1").is_dir()


# --- Integrity: damaged steps are detected, reported and skipped ---------------------------


def _largest_data_file(step_dir: epath.Path) -> epath.Path:
    """The biggest array-data file of a step (OCDBT keeps array chunks under .../d/)."""
    files = [p for pattern in ("default/d/*", "default/*/d/*") for p in step_dir.glob(pattern)]
    return max(files, key=lambda p: len(p.read_bytes()))


def _flip_byte(path: epath.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: epath.Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _big_state(seed):
    # Big enough that the middle of its data file is array bytes, not an index.
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32), "n": seed}


def test_checksums_see_one_flipped_bit_and_not_the_sharding():
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    sharded = jax.device_put(x, NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("a", "b")))
    want = checkpoint.checksums({"x": x})  # NumPy, on the host.
    assert checkpoint.checksums({"x": jnp.asarray(x)}) == want  # One device.
    assert checkpoint.checksums({"x": sharded}) == want  # Eight shards.
    for position, bit in ((0, 0), (77, 31), (127, 15)):
        flipped = x.copy().view(np.uint32)
        flipped.flat[position] ^= np.uint32(1 << bit)
        assert checkpoint.checksums({"x": flipped.view(np.float32)}) != want
    # Two top bits flipped (they cancel in a plain sum mod 2^32) and two words swapped.
    both = x.copy().view(np.uint32)
    both.flat[3] ^= np.uint32(1 << 31)
    both.flat[9] ^= np.uint32(1 << 31)
    assert checkpoint.checksums({"x": both.view(np.float32)}) != want
    swapped = x.copy()
    swapped.flat[[0, 1]] = swapped.flat[[1, 0]]
    assert checkpoint.checksums({"x": swapped}) != want
    for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.uint32):
        y = np.asarray(x > 0).astype(dtype)
        assert checkpoint.checksums({"y": y}) == checkpoint.checksums({"y": jnp.asarray(y)})


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["changed", "truncated"])
def test_a_damaged_newest_step_is_reported_and_the_one_before_restored(tmp_path, damage, caplog):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _big_state(1))
        ckpt.save(2, _big_state(2))
    damage(_largest_data_file(epath.Path(tmp_path) / "2"))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="Step 2 in .*") as error:
            ckpt.restore(2)
        assert error.value.step == 2
        if damage is _flip_byte:  # Orbax reads it without complaint; the checksum names it.
            assert "checksum mismatch in ['w']" in str(error.value)
        step, state = ckpt.restore_newest_intact()
        assert step == 1
        _assert_trees_equal(state, _big_state(1))
        assert ckpt.all_steps() == [1]
        ckpt.save(2, _big_state(2))  # The step number is free again.
        ckpt.wait()
        _assert_trees_equal(ckpt.restore(2), _big_state(2))
    assert any("Step 2 in" in r.message and "Trying the step before" in r.message
               for r in caplog.records)  # fmt: skip
    aside = [name for name in os.listdir(tmp_path) if name.startswith("2.corrupt-")]
    assert len(aside) == 1  # Kept to look at, never listed as a step.


def test_when_no_step_is_intact_the_error_lists_them_and_moves_nothing(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _big_state(1))
        ckpt.save(2, _big_state(2))
    for step in ("1", "2"):
        _flip_byte(_largest_data_file(epath.Path(tmp_path) / step))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CorruptCheckpointError) as error:
            ckpt.restore_newest_intact()
        assert ckpt.all_steps() == [1, 2]
    message = str(error.value)
    assert "No step in" in message and "Step 2 in" in message and "Step 1 in" in message
    assert "delete the directory to start over" in message
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_target_that_fits_no_step_moves_nothing(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _big_state(1))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="no longer fits"):
            ckpt.restore_newest_intact(target={"other": jax.ShapeDtypeStruct((2,), jnp.int32)})
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_a_damaged_step_on_gcs_is_detected_and_set_aside(gcs_bucket):
    directory = epath.Path(gcs_bucket) / "ckpt"
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(1, _big_state(1))
        ckpt.save(2, _big_state(2))
    _flip_byte(_largest_data_file(directory / "2"))
    with checkpoint.Checkpointer(directory) as ckpt:
        step, state = ckpt.restore_newest_intact()
        assert step == 1 and ckpt.all_steps() == [1]
    _assert_trees_equal(state, _big_state(1))
    assert [p.name for p in directory.iterdir() if p.name.startswith("2.corrupt-")]
