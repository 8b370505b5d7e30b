"""Multi-host: joining a `jax.distributed` job, writing from one process, gathering arrays.

    joined = initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=i)  # first
    ...
    on_main_process(paths.write_text, workdir / "eval.json", text)  # every process calls it
    params = process_allgather(state["params"])                      # NumPy, on every process

A job spread over processes writes two kinds of files. Arrays sharded over the processes
(orbax checkpoints, tensorstore arrays) are written by every process, each its own shards.
Everything else (configs, metrics, SAE folders, exports, reports, dashboards) is written by
process 0 alone, through `on_main_process`, after the arrays it needs are gathered on every
process (a gather is a collective: all processes take part).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from absl import logging
from jax._src import xla_bridge
from jax.experimental import multihost_utils

T = TypeVar("T")

# The environment variables that ask for a multi-process job, as the flags of the same names
# do (JAX reads the first itself; the other two are ours, for launchers that set variables).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT = 300  # Seconds; JAX's own default for joining.
# JAX is given this much longer than our watchdog, so that ours speaks first (JAX aborts
# the process from C++ with "DEADLINE_EXCEEDED" and no word on the cause).
_JAX_TIMEOUT_MARGIN = 30
_FIX = (
    "Start every process with the same --coordinator_address (process 0's host:port, "
    "reachable from all hosts) and --num_processes, and a distinct --process_id in "
    "0..num_processes-1 (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
    "--distributed_timeout gives slow starters more time."
)


class DistributedInitError(RuntimeError):
    """Joining a multi-process `jax.distributed` job that was asked for failed."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(f"{name}={value!r} is not an integer.") from None


def _coordinator_reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _give_up(address: str | None, num_processes: int | None, process_id: int | None, timeout):
    """The watchdog's end: says why the join hangs and ends the process (exit status 1)."""
    where = address or "the coordinator JAX detected"
    if process_id == 0:
        cause = (
            f"this process (process 0) serves the coordinator at {where}, but not all "
            f"{num_processes or 'the'} processes joined"
        )
    elif address is not None and not _coordinator_reachable(address):
        cause = (
            f"nothing accepts connections at {address} (process 0 is not running, has "
            "already ended, or listens at another host:port)"
        )
    else:
        cause = (
            f"{where} accepts connections but the job did not form (not all "
            f"{num_processes or 'the'} processes started, or with different --num_processes)"
        )
    message = (
        f"Could not join the jax.distributed job within {timeout:g} s as process "
        f"{process_id if process_id is not None else '?'} of {num_processes or '?'}: {cause}. "
        f"{_FIX}\n"
    )
    sys.stdout.flush()
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(1)  # The main thread is inside JAX's C++ join; an exception cannot reach it.


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    required: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs,
) -> bool:
    """Joins a multi-process `jax.distributed` job; call before any other JAX use.

    A job is asked for by any of `coordinator`, `num_processes`, `process_id` (or the
    environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or by
    `required=True`; what is not given JAX detects (TPU pod slice, SLURM, Open MPI, ...).
    Asked for, a join that fails is an error, never a silent single-process run (which
    would be N independent runs writing one workdir). Not asked for, a cluster JAX detects
    is joined and no cluster means one process; `num_processes=1` alone is one process.
    Calling it again once joined is a no-op. Logs the process index, the process count and
    the local and global device counts.

    Args:
      coordinator: 'host:port' of process 0's coordinator service.
      num_processes: Number of processes.
      process_id: This process's index in 0..num_processes-1.
      required: Join or fail even with no argument or variable (the `--distributed` flag);
        `False` never fails for want of a cluster. Default: asked for iff something is given.
      timeout: Seconds to wait for every process to join. A join still waiting then ends
        the process (exit status 1) with a message naming the cause: JAX would abort it
        later from C++ without one.
      **kwargs: Passed to `jax.distributed.initialize` (e.g. local_device_ids).

    Returns:
      Whether this process is part of a `jax.distributed` job.

    Raises:
      DistributedInitError: When asked for and JAX is already in use in this process (too
        late to join), no cluster is detected and not enough is given, the values are
        invalid, or JAX fails to join.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = not (coordinator is None and num_processes is None and process_id is None)
    asked = given if required is None else required
    if num_processes == 1 and coordinator is None and process_id in (None, 0):
        return False  # One process needs no coordinator.
    if num_processes is not None and num_processes < 1:
        raise DistributedInitError(f"num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise DistributedInitError(
            f"process_id {process_id} is outside 0..{(num_processes or 1) - 1}. {_FIX}"
        )
    if xla_bridge.backends_are_initialized():  # The test jax.distributed itself makes.
        if asked:
            raise DistributedInitError(
                "jax.distributed must be joined before any other JAX use (computations, "
                "jax.devices(), device_put), and this process has used JAX already; call "
                "initialize_distributed first thing in main."
            )
        logging.warning(
            "initialize_distributed() after JAX was first used: no cluster can be joined "
            "now; running as one process."
        )
        return False
    timeout = float(timeout)
    if timeout <= 0:
        raise DistributedInitError(f"timeout must be > 0 seconds, got {timeout}.")
    logging.info(
        "Joining a jax.distributed job: coordinator %s, process %s of %s (timeout %g s).",
        coordinator or "(detected)",
        "(detected)" if process_id is None else process_id,
        num_processes or "(detected)",
        timeout,
    )
    watchdog = threading.Timer(timeout, _give_up, (coordinator, num_processes, process_id, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=int(timeout) + _JAX_TIMEOUT_MARGIN,
            **kwargs,
        )
    except ValueError as error:  # JAX detected no cluster and was not given enough.
        if not asked:
            logging.info("No cluster detected (%s); running as one process.", error)
            return False
        raise DistributedInitError(
            "A multi-process job was asked for, but JAX detected no cluster (TPU pod slice, "
            f"SLURM, Open MPI) and was not given enough to join one ({error}). {_FIX}"
        ) from error
    except Exception as error:
        raise DistributedInitError(
            f"Joining the jax.distributed job failed: {error}. {_FIX}"
        ) from error
    finally:
        watchdog.cancel()
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """Whether this process writes the files that are not sharded arrays (process 0)."""
    return jax.process_index() == 0


def on_main_process(write: Callable[..., T], *args, **kwargs) -> T | None:
    """`write(*args, **kwargs)` on process 0 only; every process must call it.

    For files that are not arrays sharded over the processes (configs, reports, SAE folders,
    exports, dashboards): one writer, whatever the number of processes. Every process
    returns only once process 0 is done (a barrier), so each may read what was written
    next; a failure on process 0 is raised on every process, so none goes on without it.
    `write` must not itself need the other processes (no collectives, no gathers: gather
    first, on every process, with `process_allgather`).

    Returns:
      What `write` returned, on process 0; None on the others.

    Raises:
      Whatever `write` raised, on process 0; `RuntimeError` naming it on the others.
    """
    if jax.process_count() == 1:
        return write(*args, **kwargs)
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = write(*args, **kwargs)
        except Exception as e:  # Told to the others below, then raised.
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if int(failed):
        name = getattr(write, "__qualname__", repr(write))
        raise RuntimeError(f"Process 0 failed in {name} (see its log); stopping here too.")
    return result


def process_allgather(tree: Any) -> Any:
    """The full value of each (possibly multi-host sharded) array as NumPy, on every process.

    A collective: every process must call it. Wraps `multihost_utils.process_allgather(...,
    tiled=True)`: without `tiled=True`, arrays spread over processes come back stacked per
    process instead of as the global array.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
