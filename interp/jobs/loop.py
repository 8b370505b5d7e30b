"""The one training loop every job shares: sharded state, steps, metrics, eval, checkpoints.

A job describes its training as a `Task` and hands it to `train`:

    task = loop.Task(
        init=lambda: loop.sharded_init(build_state, shardings, mesh, key_data),  # fresh
        abstract=loop.abstract_state(build_state, shardings, key_data),  # restore target
        step=step_fn,                       # (state, batch) -> (state, metrics); jitted
        batch=lambda step: batches.get(step),  # 0-based step index -> batch
    )
    state, summary = loop.train(task, workdir, loop.LoopConfig(steps=1000, ...),
                                writer=writer, tokens_per_step=B * T, evaluate=eval_fn)

What the loop does, so no job writes it again:
- resume: the newest finished checkpoint under `<workdir>/checkpoints` is restored straight
  into the target shardings (`Task.abstract`), whatever mesh it was saved from; otherwise
  `Task.init` builds the state already sharded (`jax.jit(init, out_shardings=...)` from
  `jax.eval_shape`: nothing is materialized unsharded, no host-local array is saved);
- steps `start + 1 .. steps`, each `state, metrics = task.step(state, task.batch(step - 1))`;
  `batch` must depend on the step index alone, so a resumed run sees the batches an
  uninterrupted one would;
- every `log_every` steps (and the last): metrics to `metrics.jsonl` / TensorBoard and a
  progress line with tokens/s and ETA; every `eval_every` steps (and the last): `evaluate`;
  every `checkpoint_every` steps (and the last): an atomic orbax checkpoint;
- preemption: on SIGTERM (or Ctrl-C) the step under way finishes, is saved, the save is
  committed, and `train` raises `preemption.Preempted` ("preempted at step N of M; rerun the
  same command to resume"); in a multi-process job every process stops at the same step
  (`interp.preemption`). A damaged newest checkpoint is reported and the one before it is
  restored (`checkpoint.Checkpointer.restore_newest_intact`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging
from etils import epath

from interp import checkpoint, metrics, preemption

State = Any
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long the loop runs and how often it reports and saves.

    None of these changes what a step computes, so a resumed run may change any of them but
    `steps` freely (`steps` only where the learning-rate schedule has its own length).

    Attributes:
      steps: The step training ends at.
      log_every: Steps between metric writes and progress lines.
      eval_every: Steps between evaluations; 0 evaluates only at the end.
      checkpoint_every: Steps between checkpoints; the last step is always saved.
      keep_checkpoints: How many of the newest checkpoints to keep.
    """

    steps: int
    log_every: int = 100
    eval_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            try:
                number = operator.index(value)  # ints, NumPy ints; not floats or bools.
            except TypeError:
                number = None
            minimum = 0 if name == "eval_every" else 1
            if isinstance(value, bool) or number is None or number < minimum:
                raise ValueError(f"LoopConfig.{name} must be an int >= {minimum}, got {value!r}.")
            object.__setattr__(self, name, number)


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop trains.

    Attributes:
      init: () -> a fresh state, already in its sharded layout (see `sharded_init`).
      abstract: The state as `jax.ShapeDtypeStruct`s carrying the target shardings (see
        `abstract_state`): where a checkpoint is restored to.
      step: (state, batch) -> (new state, metrics); the state may be donated. Metrics are a
        pytree of scalars, flattened by `flatten` for writing.
      batch: 0-based step index -> the batch of that step.
      flatten: metrics -> {name: float}; default: a flat dict of scalars as it is.
      shown: Which flattened metrics the progress line shows, and as what: name -> False
        (not shown), True (shown under its name) or a shorter label; default all.
    """

    init: Callable[[], State]
    abstract: State
    step: Callable[[State, Any], tuple[State, Any]]
    batch: Callable[[int], Any]
    flatten: Callable[[Any], dict[str, float]] | None = None
    shown: Callable[[str], bool | str] | None = None


def sharded_init(build: Callable[..., State], shardings: State, mesh, *args) -> State:
    """`jax.jit(build, out_shardings=shardings)(*args)` under the mesh.

    Every device computes only its own shards, and every leaf (a step counter included) is
    a global array: the state saves from and restores to any number of processes. Pass keys
    as raw key data (NumPy), which every process of a multi-host job can hand to jit.
    """
    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(*args)


def abstract_state(build: Callable[..., State], shardings: State, *args) -> State:
    """`jax.eval_shape(build, *args)` with `shardings` attached: a checkpoint's restore target."""
    return checkpoint.abstract_like(jax.eval_shape(build, *args), shardings)


def _flatten_default(out: Any) -> dict[str, float]:
    if not isinstance(out, Mapping):
        raise TypeError(f"Step metrics are {type(out).__name__}; give Task.flatten to name them.")
    return {k: float(v) for k, v in out.items()}


def train(
    task: Task,
    workdir: epath.PathLike,
    config: LoopConfig,
    *,
    writer: metrics.MetricWriter | None = None,
    tokens_per_step: int | None = None,
    evaluate: Callable[[State], Mapping[str, float]] | None = None,
    name: str = "training",
) -> tuple[State, dict[str, float]]:
    """Trains `task` to `config.steps`, resuming from the newest checkpoint in the workdir.

    Args:
      task: The state and step (see `Task`).
      workdir: Checkpoints go to `<workdir>/checkpoints` (local or gs://).
      config: Length and reporting intervals.
      writer: Where metrics and evaluations go; None writes none (progress is logged anyway).
      tokens_per_step: For the progress line's tokens/s (None: steps/s).
      evaluate: state -> {name: float}, run every `eval_every` steps and at the end.
      name: What the log lines call this run ("LM training", "SAE training").

    Returns:
      (final state, the last evaluation's figures or {} without `evaluate`). A run resumed at
      `config.steps` takes no step, and evaluates the restored state.

    Raises:
      ValueError: If the newest checkpoint is past `config.steps` (a lowered `steps` would
        otherwise hand back the later state as if it were the step asked for).
      preemption.Preempted: On SIGTERM/SIGINT, once the step reached is saved and committed.
      checkpoint.CorruptCheckpointError: If no checkpoint in the workdir can be restored.
    """
    ckpt = checkpoint.Checkpointer(
        epath.Path(workdir) / CHECKPOINT_DIR, max_to_keep=config.keep_checkpoints
    )
    try:
        start = ckpt.latest_step() or 0
        if start > config.steps:
            raise ValueError(
                f"{ckpt.directory} holds a checkpoint at step {start}, past steps="
                f"{config.steps}: the run went further already. Ask for steps >= {start} to "
                "go on from it, or use a new workdir to stop earlier."
            )
        if start:
            # The newest step that reads back intact (a damaged one is reported, set aside).
            start, state = ckpt.restore_newest_intact(target=task.abstract)
            logging.info("Resumed %s from step %d of %d.", name, start, config.steps)
        else:
            state = task.init()
        progress = metrics.Progress(config.steps, tokens_per_step, start_step=start)
        with preemption.Preemption() as preempt:
            state, summary, evaluated = _steps(
                task, ckpt, config, state, start, progress, preempt, writer, evaluate, name
            )
        if evaluate is not None and not evaluated:  # Resumed at the end: nothing ran.
            summary = dict(evaluate(state))
    finally:
        ckpt.close()
    return state, summary


def _steps(task, ckpt, config, state, start, progress, preempt, writer, evaluate, name):
    """Steps start + 1 .. config.steps; returns (state, last evaluation, whether one ran)."""
    flatten = task.flatten or _flatten_default
    summary: dict[str, float] = {}
    evaluated = False
    for step in range(start + 1, config.steps + 1):
        state, out = task.step(state, task.batch(step - 1))
        last = step == config.steps
        if step % config.log_every == 0 or last:
            scalars = flatten(out)
            if writer is not None:
                writer.write(step, scalars)
            shown = {}
            for metric, value in scalars.items():
                label = True if task.shown is None else task.shown(metric)
                if label:
                    shown[metric if label is True else label] = value
            progress.update(step, **shown)
        # Saved before evaluating: an evaluation that fails loses no training.
        if step % config.checkpoint_every == 0 or last:
            ckpt.save(step, state)
        if evaluate is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            summary, evaluated = dict(evaluate(state)), True
            if writer is not None:
                writer.write(step, summary)
            logging.info("%s step %d: %s", name, step, _format(summary))
        # Every step, on every process (the multi-process sync point counts calls).
        if preempt.reached(step):
            if step not in ckpt.all_steps():
                ckpt.save(step, state)
            ckpt.wait()  # Committed before anyone is told to rerun.
            raise preempt.stop(step, config.steps, name)
    return state, summary, evaluated


def _format(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())
