"""Stopping a long loop cleanly on SIGTERM (TPU maintenance, spot preemption) or Ctrl-C.

    with preemption.Preemption() as preempt:
        for step in range(start + 1, steps + 1):
            state = train_step(state, batch(step))
            if preempt.reached(step):             # Every process, at every step boundary.
                ckpt.save(step, state); ckpt.wait()
                raise preempt.stop(step, steps, "training")

`reached()` is True on every process at the same call once a preemption notice came:

- one process: a SIGTERM or SIGINT handler (installed on entering, restored on leaving)
  records the signal; the next `reached()` is True. A second signal of the same kind while the
  first is pending gets the previous handler (a second Ctrl-C interrupts at once);
- several processes (`jax.distributed`): JAX's preemption sync manager, which catches SIGTERM
  in C++ (so no Python handler is installed, which would replace it) and makes every process
  agree on one step: `reached(step)` calls `multihost_utils.reached_preemption_sync_point(
  step)`, and the first step past the furthest any process had reported when the notice
  came is where every process stops. `step` must grow from call to call and be the
  checkpoint step saved there, because orbax's `CheckpointManager.save` reports its step to
  the same sync manager. SIGINT is not caught there (it reaches one process only).

`Preempted` carries the exit code the experiment mains exit with: 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), what a shell reports for a process that signal ended.
Non-zero, so `a && b` and the pipeline stop there, and schedulers that restart a task
whose exit code is not 0 (Kubernetes `OnFailure`, Slurm `--requeue` wrappers) rerun it,
which resumes from the checkpoint just written.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

import jax
from absl import logging

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A loop stopped early on a preemption notice, after saving its progress.

    Rerunning the same command resumes from the checkpoint written at `step`.

    Attributes:
      step: The step (or batch count, or row count: see `unit`) reached and saved.
      total: The step the run would have ended at (None: not known).
      signal_number: The signal that asked to stop (SIGTERM in multi-process runs).
      exit_code: 128 + signal_number: what a process ends with after this.
    """

    def __init__(
        self,
        step: int,
        total: int | None,
        signal_number: int,
        what: str = "run",
        unit: str = "step",
    ):
        self.step, self.total, self.signal_number = step, total, signal_number
        self.exit_code = 128 + signal_number
        name = signal.Signals(signal_number).name
        of = "" if total is None else f" of {total}"
        super().__init__(
            f"{what} preempted ({name}) at {unit} {step}{of}; rerun the same command to resume."
        )


class Preemption:
    """Catches preemption notices for one loop; see the module docstring.

    Use as a context manager around the loop, entered on every process. Entering from a
    thread other than the main one catches nothing (Python delivers signals to the main
    thread only) and says so in the log.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        """Args: signals: What counts as a notice in a single-process run."""
        self._signals = tuple(signals)
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._multiprocess = False

    def __enter__(self) -> Preemption:
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            return self  # JAX's preemption sync manager catches SIGTERM (module docstring).
        if threading.current_thread() is not threading.main_thread():
            logging.info("Not in the main thread: preemption signals are not caught here.")
            return self
        for number in self._signals:
            self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, previous in self._previous.items():
            # None: the handler was not set from Python (a C++ one); the default is the nearest.
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _on_signal(self, number, frame) -> None:
        if self._received is not None:  # Asked twice: the previous handler, at once.
            previous = self._previous.get(number, signal.SIG_DFL)
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
            signal.raise_signal(number)
            return
        self._received = number
        logging.warning(
            "Received %s: stopping at the next step boundary after a checkpoint (send it "
            "again to stop at once, without one).",
            signal.Signals(number).name,
        )

    def reached(self, step: int) -> bool:
        """Whether to stop now; call at every step boundary, on every process alike.

        Args:
          step: The step just finished: increasing from call to call, the same on every
            process, and the step number a checkpoint saved there gets.
        """
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self._received = signal.SIGTERM
        return self._received is not None

    def stop(
        self, step: int, total: int | None, what: str = "run", unit: str = "step"
    ) -> Preempted:
        """Logs the stop and returns the `Preempted` to raise (after the checkpoint is saved).

        `unit` names what `step` counts in the message ('step', 'row', ...)."""
        number = self._received if self._received is not None else signal.SIGTERM
        error = Preempted(step, total, number, what, unit)
        logging.warning("%s", error)
        return error
