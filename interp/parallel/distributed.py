"""Multi-host: joining a `jax.distributed` job and gathering global arrays."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> None:
    """`jax.distributed.initialize`, tolerant of single-process runs.

    Call before any other JAX use. With no arguments, a cluster JAX can detect (TPU pod,
    SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS set) is joined; otherwise this is a no-op
    (one process). Calling it again after a successful initialization is a no-op.

    Args:
      coordinator: 'host:port' of process 0's coordinator service.
      num_processes: Number of processes.
      process_id: This process's index in 0..num_processes-1.
      **kwargs: Passed to `jax.distributed.initialize` (e.g. local_device_ids).
    """
    if jax.distributed.is_initialized():
        return
    explicit = not (coordinator is None and num_processes is None and process_id is None)
    if not explicit and not kwargs:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            # ValueError: no cluster detected; RuntimeError: JAX is already in use here.
            logging.info("Running as a single process (%s).", error)
            return
    elif num_processes == 1 and coordinator is None:
        return
    else:
        if coordinator is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            logging.info("No coordinator given; relying on cluster auto-detection.")
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def process_allgather(tree: Any) -> Any:
    """The full value of each (possibly multi-host sharded) array as NumPy, on every process.

    Wraps `multihost_utils.process_allgather(..., tiled=True)`: without `tiled=True`, arrays
    spread over processes come back stacked per process instead of as the global array.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
