"""The flags every experiment main takes, and `run`, which every main ends with.

--config (an ml_collections config file) and --workdir; and, for a multi-process job (a TPU
pod slice, a GPU cluster, several CPU processes), --distributed, --coordinator_address,
--num_processes, --process_id and --distributed_timeout:

    if __name__ == "__main__":
        common.run(main)  # absl's app.run, joining jax.distributed first when asked.
"""

import functools
import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if non-empty.")
flags.mark_flag_as_required("workdir")

DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process jax.distributed job, as JAX detects it (TPU pod slice, SLURM, "
    "Open MPI) or as the three flags below give it; a failed join is an error.",
)
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator (implies --distributed; or JAX_COORDINATOR_ADDRESS).",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (implies --distributed; or JAX_NUM_PROCESSES)."
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (or JAX_PROCESS_ID)."
)
DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Seconds to wait for every process to join; then this process exits with an error.",
)

# Process 0 serves the coordinator: it leaves last, or the others abort from their
# coordination-service poll thread when it goes.
_COORDINATOR_GRACE_S = 2.0


def initialize() -> bool:
    """Joins the multi-process job the flags or environment ask for; returns whether one
    was joined (False: one process, as without these flags).

    Call before any other JAX use (`run` does).

    Raises:
      interp.parallel.DistributedInitError: When asked for and the join fails.
    """
    from interp import parallel  # Imports JAX; uses no device.

    given = (COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)
    env = [os.environ.get(name) for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                             "JAX_PROCESS_ID")]  # fmt: skip
    asked = DISTRIBUTED.value or any(v is not None for v in given) or any(env)
    if not asked:
        return False
    return parallel.initialize_distributed(*given, required=True, timeout=DISTRIBUTED_TIMEOUT.value)


def _flush() -> None:
    for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def _leave(status: int) -> None:
    """Ends a process of a multi-process job: flushed, then `os._exit`, because
    `jax.distributed.shutdown()` and interpreter teardown sometimes hang in C++."""
    import jax

    if status == 0:
        # Everyone done before anyone goes: the coordinator (process 0) leaves last.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("experiments.common.run: leave")
        if jax.process_index() == 0:
            time.sleep(_COORDINATOR_GRACE_S)
    _flush()
    os._exit(status)


def _exit_status(code) -> int:
    """What `sys.exit(code)` would exit with."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


# What a job exits with when its config or data contradict its workdir's, or an SAE its model
# (the errors of `_refusals`): a message naming the fix, not a traceback. EX_USAGE of sysexits.h.
REFUSED_EXIT_CODE = 64


def _refusals() -> tuple[type[BaseException], ...]:
    """The errors a job raises to refuse a run whose inputs contradict what it is resuming
    or using, each with a message that names the fix."""
    from interp.jobs import sae, workdir

    return (
        workdir.ConfigMismatchError,
        workdir.DataMismatchError,
        sae.SAEModelMismatchError,
        sae.CacheModelMismatchError,
    )


# What a job exits with when another job holds its workdir: EX_TEMPFAIL of sysexits.h, "try
# again later" (a rerun succeeds once the holder ends, or its lock goes stale).
LOCKED_EXIT_CODE = 75


def _terminated(number, frame):
    """SIGTERM outside a loop that catches it (loading, exporting): an exit that unwinds,
    so the workdir's lock is released on the way out, with the status SIGTERM gives."""
    raise SystemExit(128 + number)


def _holding_workdir(main, argv, multiprocess: bool):
    """`main(argv)` while this job holds --workdir (interp/jobs/lock.py); another job
    holding it is a message and LOCKED_EXIT_CODE, not a traceback."""
    import signal
    import threading

    from interp.jobs import lock

    # Multi-process jobs leave SIGTERM to JAX's preemption sync manager (C++).
    catch = not multiprocess and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if catch else None
    try:
        with lock.hold(WORKDIR.value):
            return main(argv)
    except lock.WorkdirLockedError as error:
        logging.error("%s", error)
        return LOCKED_EXIT_CODE
    finally:
        if catch:  # None: a handler not set from Python; the default is the nearest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(main, argv):
    if not initialize():
        return _holding_workdir(main, argv, multiprocess=False)
    try:
        status = _exit_status(_holding_workdir(main, argv, multiprocess=True))
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:
        # A failing process must end non-zero, and visibly: the others then stop at their
        # next collective (JAX's heartbeat ends them), never as if the job had finished.
        logging.exception("This process of the multi-process job failed.")
        status = 1
    _leave(status)


def run(main) -> None:
    """`absl.app.run(preemptible(main))`, in a multi-process job when the flags or
    environment ask, holding --workdir while `main` runs: a second job on the same workdir
    exits with LOCKED_EXIT_CODE and a message naming the holder (interp/jobs/lock.py).

    In a multi-process job `jax.distributed` is joined before `main` runs, and the process ends with
    `os._exit` once everything is flushed: 0 after every process finished `main`, the
    preemption exit code after a preemption, 1 (with the traceback logged) when `main`
    failed here.
    """
    app.run(functools.partial(_main, preemptible(main)))


def preemptible(main):
    """`main` for `app.run`, exiting with `Preempted.exit_code` (143 after SIGTERM, 130 after
    Ctrl-C; see interp/preemption.py) when the job stopped on a preemption notice, after
    its checkpoint was committed, and with REFUSED_EXIT_CODE when it refused its inputs (a
    changed config or data, an SAE of another model): a log line, not a traceback."""
    from absl import logging

    from interp import preemption

    refusals = _refusals()

    def run(argv):
        try:
            return main(argv)
        except preemption.Preempted as stopped:
            logging.warning("Exiting with %d: %s", stopped.exit_code, stopped)
            return stopped.exit_code
        except refusals as refused:  # The message is the report: no traceback.
            logging.error("%s: %s", type(refused).__name__, refused)
            return REFUSED_EXIT_CODE

    return run
