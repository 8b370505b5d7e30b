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
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from interp import paths

PyTree = Any


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
            self.directory, options=options, item_handlers=ocp.PyTreeCheckpointHandler()
        )
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
        try:
            return self._manager.save(step, args=ocp.args.PyTreeSave(state), force=force)
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
            args = ocp.args.PyTreeRestore()
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        return self._manager.restore(step, args=args)

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
