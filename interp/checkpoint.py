"""Checkpoints: one orbax `CheckpointManager` over a local or `gs://` directory.

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, target=abstract_state)  # ShapeDtypeStructs with shardings
    ...
    ckpt.save(step, state)  # Async: returns once the arrays are copied off the devices.
    ckpt.close()

Layout: `<directory>/<step>/default/` holds one pytree in orbax's PyTree format (OCDBT +
zarr3 for arrays, JSON for Python scalars and strings). What makes a step count as written:

- local disk: orbax writes `<step>.orbax-checkpoint-tmp-<time>/` and renames it to `<step>/`
  when every array is on disk, so a killed save leaves only a tmp directory;
- `gs://` (no atomic directory rename): orbax writes `<step>/` in place and adds
  `commit_success.txt` last, so a killed save leaves a step without the marker.

Neither leftover is reported by `latest_step()` / `all_steps()`, and
`cleanup_tmp_directories=True` deletes them when the next `Checkpointer` opens the directory.
Finished steps are never overwritten (saving an existing step is an error); only `max_to_keep`
deletes them, oldest first, after a newer save has been committed.

Integrity: orbax notices a truncated or missing file, but not changed bytes inside an array
chunk (zstd frames carry no checksum, and zarr keeps none), which restore as wrong numbers. So
each step also holds `<step>/checksums/`: per leaf, its dtype, shape and a 64-bit checksum of
its bytes (`checksums`), computed on device when the step is saved, committed with it, and
compared after every restore. The checksum is a sum of position-weighted words modulo 2^32,
so it is the same whatever the sharding (a restore onto another mesh verifies) and any single
changed bit changes it. `restore_newest_intact` restores the newest step that reads and
verifies, and moves newer damaged steps aside (to `<step>.corrupt-<time>`) with a warning.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from interp import parallel, paths

PyTree = Any
STATE, CHECKSUMS = "default", "checksums"  # The items of a step (subfolders).


class CorruptCheckpointError(RuntimeError):
    """A saved step cannot be read back, or reads back other bytes than were saved.

    Attributes:
      step: The step (None when no step of the directory could be restored).
      directory: The checkpoint directory.
    """

    def __init__(self, message: str, step: int | None, directory: Any):
        super().__init__(message)
        self.step, self.directory = step, directory


class Checkpointer:
    """Saves and restores one pytree per step under a local or `gs://` directory.

    The state is any pytree whose leaves are `jax.Array`s, NumPy arrays, Python scalars
    (`int`, `float`, `bool`) or strings, so a small JSON-able dict of metadata (the data
    iterator's position, the tokenizer's name) can ride along with the arrays:

        ckpt.save(step, {"params": params, "opt": opt_state, "meta": {"data_step": 1200}})

    In multi-process runs every process calls `save` and `restore` with the same step; arrays
    must be global (a host-local `jnp.asarray(3)` cannot be saved, use a Python or NumPy
    scalar instead).

    Attributes:
      directory: Where the steps live.
    """

    def __init__(
        self,
        directory: epath.PathLike,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        """Opens (and creates) a checkpoint directory.

        Args:
          directory: Local path or `gs://bucket/path`.
          max_to_keep: How many of the newest steps to keep; `None` keeps all.
          save_interval_steps: `save` writes only steps divisible by this, unless forced.
          async_save: Write in a background thread: `save` returns once the arrays are copied
            to host memory, so the caller may donate or overwrite them. Call `wait()` before
            reading the files, and `close()` (or use `with`) before exiting.

        Raises:
          ValueError: On a non-positive `max_to_keep` or `save_interval_steps`.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        # Absolute: orbax's tensorstore layer refuses relative paths ("should be absolute").
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            # Deletes what killed saves left (tmp directories locally, steps without
            # commit_success.txt on gs://); they are never reported as steps either way.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.PyTreeCheckpointHandler(),
                CHECKSUMS: ocp.JsonCheckpointHandler(),
            },
        )
        self._save_interval_steps = save_interval_steps
        self._closed = False

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Saves `state` as `step`, unless `save_interval_steps` says to skip it.

        Args:
          step: Non-negative step number; must not be saved already.
          state: The pytree to save (see the class docstring for allowed leaves).
          force: Save even if `step` is not a multiple of `save_interval_steps`.

        Returns:
          Whether a save was started.

        Raises:
          FileExistsError: If `step` is already saved in this directory.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        if not force and step % self._save_interval_steps:
            return False  # Skipped: no checksums to compute.
        args = ocp.args.Composite(
            **{STATE: ocp.args.PyTreeSave(state), CHECKSUMS: ocp.args.JsonSave(checksums(state))}
        )
        try:
            return self._manager.save(step, args=args, force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise FileExistsError(
                f"Step {step} is already saved in {self.directory}; checkpoints are never "
                f"overwritten. Saved steps: {self.all_steps()}."
            ) from e

    def latest_step(self) -> int | None:
        """The newest finished step, or `None` if there is none.

        Counts steps finished when this object was created plus those it saved since
        (an async save counts once `save` returns).
        """
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finished steps, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, target: PyTree | None = None) -> PyTree:
        """Reads a saved step back.

        Args:
          step: Which step; the latest if `None`.
          target: What to restore into, matching the saved tree's structure:
            - an abstract tree of `jax.ShapeDtypeStruct`s carrying `sharding`s (from
              `jax.eval_shape` plus the partitioning rules): each array is read straight
              into its target sharding, each device reading only its shards, so nothing is
              materialized unsharded. A `ShapeDtypeStruct` without a sharding comes back as
              a NumPy array;
            - a concrete tree: `jax.Array` leaves give their sharding and dtype, NumPy leaves
              come back as NumPy, Python scalars and strings as themselves;
            - `None`: everything comes back as saved, jax arrays with the shardings they were
              saved with (which needs the same devices; pass a target after a change of
              topology).

        Returns:
          The restored pytree.

        Raises:
          FileNotFoundError: If the directory holds no finished step, or not `step`.
          CorruptCheckpointError: If the step's files cannot be read, or their arrays differ
            from the checksums saved with them (steps saved without checksums restore with
            a warning).
        """
        self._check_open()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"No checkpoint to restore in {self.directory}: it holds no finished step "
                    "(unfinished saves do not count)."
                )
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; finished steps: {steps}."
            )
        if target is None:
            state_args = ocp.args.PyTreeRestore()
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            state_args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        items = {STATE: state_args}
        verified = (self.directory / str(step) / CHECKSUMS).exists()
        if verified:
            items[CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files.
            raise CorruptCheckpointError(
                f"Step {step} in {self.directory} cannot be read ({type(e).__name__}: "
                f"{_first_line(e)}).",
                step,
                self.directory,
            ) from e
        state = restored[STATE]
        if not verified:
            logging.warning(
                "Step %d in %s has no checksums (saved by an older interp): restored without "
                "verifying it.",
                step,
                self.directory,
            )
            return state
        bad = _mismatches(restored[CHECKSUMS], checksums(state))
        if bad:
            raise CorruptCheckpointError(
                f"Step {step} in {self.directory} reads back other bytes than were saved "
                f"(checksum mismatch in {', '.join(bad[:5])}"
                f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}): its files under "
                f"{self.directory / str(step) / STATE} are damaged.",
                step,
                self.directory,
            )
        return state

    def restore_newest_intact(self, target: PyTree | None = None) -> tuple[int | None, PyTree]:
        """Restores the newest step that reads back intact, setting damaged newer ones aside.

        Each step, newest first, is restored and verified (see `restore`). Steps newer than
        the one restored that failed are moved to `<directory>/<step>.corrupt-<unix time>`
        (kept to look at; never listed as steps), with a warning naming the step and what
        failed, so the run goes on from the older step and saves the newer ones afresh.
        Nothing is moved unless some step restores: a restore target that fits no step (a
        changed state structure) is an error that touches nothing.

        Args:
          target: As for `restore`.

        Returns:
          (step, state), or (None, None) when the directory holds no finished step.

        Raises:
          CorruptCheckpointError: No step could be restored; the message lists each step's
            failure.
        """
        failures: list[CorruptCheckpointError] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, target)
            except CorruptCheckpointError as e:
                logging.warning("%s Trying the step before it.", e)
                failures.append(e)
                continue
            for failure in failures:
                self._set_aside(failure.step)
            if failures:
                logging.warning(
                    "Restored step %d of %s; damaged steps %s were moved aside.",
                    step,
                    self.directory,
                    [f.step for f in failures],
                )
            return step, state
        if failures:
            raise CorruptCheckpointError(
                f"No step in {self.directory} could be restored: "
                + "; ".join(str(f) for f in failures)
                + " If the files are damaged, delete the directory to start over (or restore "
                "it from a copy); if the saved state no longer fits (the code or config "
                "changed its structure), use a new workdir.",
                None,
                self.directory,
            )
        return None, None

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step to `<step>.corrupt-<time>` (process 0; all wait for it)."""

        def move():
            source = self.directory / str(step)
            destination = self.directory / f"{step}.corrupt-{int(time.time())}"
            source.rename(destination)
            logging.warning("Moved damaged step %s to %s.", source, destination)

        parallel.on_main_process(move)
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every save started so far is committed (and old steps deleted)."""
        self._manager.wait_until_finished()
        # The clean-up of leftovers starts in a background thread when the manager opens and
        # orbax only joins it inside `save`; join it here so it never outlives `close`.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads. Safe to call twice."""
        if self._closed:
            return
        self.wait()
        self._manager.close()
        self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, steps={self.all_steps()})"

    def _check_open(self) -> None:
        """Raises if `close` was called."""
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed.")


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
    """`jax.ShapeDtypeStruct`s for the arrays of `tree`, other leaves unchanged.

    A convenience to build a restore target from a tree built the normal way (for example the
    output of `jax.eval_shape`, which carries no shardings in older JAX).

    Args:
      tree: Pytree of arrays (or `ShapeDtypeStruct`s) and Python scalars.
      shardings: Optional matching tree of `jax.sharding.Sharding`s (leaves for non-array
        leaves of `tree` are ignored); defaults to each array's own sharding, if any.

    Returns:
      The abstract tree.
    """

    def one(leaf, sharding=None):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            return leaf
        sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


# ------------------------------------------------------------------------------- checksums

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)  # Odd: every weight below is odd.


def _words_jax(x: jax.Array) -> jax.Array:
    """x's bits as uint32 words (one per element; two per element for 8-byte types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
    return bits.astype(jnp.uint32)


def _words_numpy(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return np.ascontiguousarray(x).view(np.uint32).reshape(*x.shape, 2)
    bits = np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])
    return bits.astype(np.uint32)


def _sums(xp, words, index):
    """Two position-weighted sums mod 2^32 (order-free, so sharding-free)."""
    out = []
    for i, multiplier in enumerate(_MULTIPLIERS):
        weights = (index * xp.uint32(multiplier) + xp.uint32(2 * i + 1)) | xp.uint32(1)
        # The second sum sees each word rotated by 16 bits, so flips in the top bit of two
        # words (which cancel in the first: 2 x 2^31 = 0 mod 2^32) still show.
        mixed = words if i == 0 else (words << xp.uint32(16)) | (words >> xp.uint32(16))
        out.append(xp.sum(mixed * weights, dtype=xp.uint32))
    return out


@jax.jit
def _checksums_jax(arrays):
    def one(x):
        words = _words_jax(x)
        index = jnp.zeros(words.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(words.ndim)):  # Flat position, without a reshape.
            index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
                stride % 2**32
            )
            stride *= words.shape[axis]
        return jnp.stack(_sums(jnp, words, index))

    return jax.tree.map(one, arrays)


def _checksum_numpy(x: np.ndarray) -> np.ndarray:
    words = _words_numpy(x)
    index = np.arange(words.size, dtype=np.uint64).astype(np.uint32).reshape(words.shape)
    with np.errstate(over="ignore"):
        return np.stack(_sums(np, words, index))


def _host(value) -> np.ndarray:
    """A computed checksum on the host (a replicated scalar pair in multi-process runs)."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    return np.asarray(value.addressable_data(0))


def checksums(tree: PyTree) -> dict[str, str]:
    """{leaf path: 'dtype[shape]:checksum'} for arrays, {leaf path: repr} for other leaves.

    The checksum is 16 hex digits: two sums over the leaf's bytes read as uint32 words, each
    word weighted by an odd function of its flat position, modulo 2^32. Exact integer sums,
    so the value does not depend on how an array is sharded or where it is computed; jax
    arrays are summed on their devices (one jitted call for the tree).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    on_device = {
        jax.tree_util.keystr(path): leaf for path, leaf in flat if isinstance(leaf, jax.Array)
    }
    computed = {k: _host(v) for k, v in _checksums_jax(on_device).items()}
    out = {}
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if key in computed:
            sums = computed[key]
        elif isinstance(leaf, np.ndarray):
            sums = _checksum_numpy(leaf)
        else:  # Python and NumPy scalars (orbax restores both as Python scalars), strings.
            out[key] = repr(leaf.item() if isinstance(leaf, np.generic) else leaf)
            continue
        shape = ",".join(str(n) for n in np.shape(leaf))
        out[key] = f"{np.dtype(leaf.dtype).name}[{shape}]:{int(sums[0]):08x}{int(sums[1]):08x}"
    return out


def _mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
    """Leaf paths whose restored checksum differs from the saved one (or is missing)."""
    return [k for k in sorted(set(saved) | set(restored)) if saved.get(k) != restored.get(k)]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
