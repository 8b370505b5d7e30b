"""Helpers for tests that run real `jax.distributed` jobs as several CPU processes."""

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices. XLA aborts a process whose
    in-process collective waits past a terminate timeout (tens of seconds by default); on the
    2-core CI machine, with xdist's workers and their subprocess mains beside it, a starved
    device thread can wait that long (seen once: an LM main aborted in an all-reduce), so tests
    allow 10 minutes (pytest-timeout still bounds each test).

    Not --xla_backend_optimization_level=0, though the suite is compile-bound (751 s -> 548 s
    with it, 2026-12-08): twice in three full runs a worker then died in XLA's
    deserialize_executable, reading from the shared compilation cache a bf16 program another
    process had compiled (tests/sae/losses_test.py::test_bfloat16_compute_is_close_to_float32;
    not reproduced in isolation)."""
    return (
        f"--xla_force_host_platform_device_count={devices}"
        " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    )


# Ends a worker script. Workers leave together, the coordinator (process 0) last: a worker
# whose coordinator is already gone aborts from its coordination-service poll thread (seen in
# CI); and os._exit because jax.distributed.shutdown() sometimes hangs in C++ teardown.
LEAVE = """
import os as _os, sys as _sys, time as _time
import jax as _jax
_sys.stdout.flush()
_sys.stderr.flush()
if _jax.distributed.is_initialized():
    from jax.experimental import multihost_utils as _multihost_utils

    _multihost_utils.sync_global_devices("leave")
    if _jax.process_index() == 0:
        _time.sleep(2)
_os._exit(0)
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Workers:
    """Worker processes started by `start_workers`; `wait()` collects them."""

    def __init__(self, processes, script_path, timeout):
        self._processes, self._script_path, self._timeout = processes, script_path, timeout

    def wait(self) -> list[str]:
        """Each worker's combined stdout and stderr; a worker that failed or outlived its
        timeout fails the test with the tail of its output."""
        try:
            outputs = [p.communicate(timeout=self._timeout + 10)[0] for p in self._processes]
        finally:
            os.unlink(self._script_path)
        for i, (process, output) in enumerate(zip(self._processes, outputs, strict=True)):
            assert process.returncode == 0, f"worker {i} failed:\n{output[-3000:]}"
        return outputs


def start_workers(
    script: str,
    argvs: Sequence[Sequence[object]],
    envs: Sequence[Mapping[str, str]] | None = None,
    *,
    local_devices: int = 4,
    timeout: int = 60,
    base_env: Mapping[str, str] | None = None,
) -> Workers:
    """Starts `script` (Python source; `LEAVE` is appended) once per argv, concurrently.

    Each process sees `local_devices` CPU devices, the repository root on sys.path, and its
    own `envs[i]` over `base_env` (default: this process's environment). The test can
    compute its single-process reference meanwhile, then call `.wait()`.
    """
    envs = envs or [{}] * len(argvs)
    base = dict(os.environ if base_env is None else base_env)
    base.update(
        XLA_FLAGS=xla_flags(local_devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, base.get("PYTHONPATH")])),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(script + LEAVE)
    command = ["timeout", "-k", "5", str(timeout), sys.executable, handle.name]
    processes = [
        subprocess.Popen(
            [*command, *map(str, argv)],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for argv, env in zip(argvs, envs, strict=True)
    ]
    return Workers(processes, handle.name, timeout)
