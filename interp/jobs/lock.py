"""One writer per workdir: a job holds its workdir, local or gs://, for its whole life.

    with lock.hold(workdir):        # experiments/common.run, and every job's run()
        ...                         # a second job on it: WorkdirLockedError, naming the holder

Two jobs on one workdir would both write its activation cache, checkpoints and metrics
(every step logged twice). The lock is `<workdir>/.lock`, a JSON file naming its holder
(host, pid, start time):

- local: the holder keeps an exclusive `flock` on the file. The kernel drops it when the
  process ends, however it ends (SIGKILL, the OOM killer), so a dead holder never blocks a
  rerun, and there is no pid to check or reuse; the file is deleted on release.
- gs://: the object is created with the precondition `ifGenerationMatch=0`, the store's own
  atomic create (`paths.write_if_generation`), never a look followed by a write. The holder
  rewrites it every `heartbeat_seconds` (`INTERP_WORKDIR_LOCK_HEARTBEAT_S`, default 30) from
  a daemon thread, each write matched to the generation it wrote last. The lock is stale
  when the store has not seen a heartbeat for `STALE_HEARTBEATS` periods (the holder's
  period, saved in the lock), or at once when its holder ran on this machine (same host,
  boot and pid namespace) and that process is gone. A rerun takes a stale lock over with a
  write matched to the stale generation, so of two rerunners exactly one gets it; the other
  then finds a live holder and stops.

Holding is re-entrant within a process (the CLI main holds --workdir and the job's `run()`
holds it again); a pipeline's stages lie in folders under its workdir and each takes its
own lock, so nothing waits for itself. Multi-process jobs take it once, on process 0; the
other processes stop when process 0 could not take it. The lock is released when the
block ends: normally, on an error, and on a preemption (`preemption.Preempted` unwinds
through it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import inspect
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from interp import parallel, paths

LOCK_FILE = ".lock"
HEARTBEAT_ENV = "INTERP_WORKDIR_LOCK_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 30.0
# A gs:// lock is stale after this many heartbeat periods without one: a few missed
# writes (a slow or failing request is retried at the next period) never free a live lock.
STALE_HEARTBEATS = 4

# Workdirs this process holds: path -> [lock, depth] (depth: nested holds of the same path).
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


class WorkdirLockedError(RuntimeError):
    """Another job holds the workdir."""


def heartbeat_seconds() -> float:
    """The gs:// heartbeat period: `INTERP_WORKDIR_LOCK_HEARTBEAT_S`, or 30 s."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{HEARTBEAT_ENV}={text!r}: give a number of seconds > 0.")
    return value


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if unknown): with the pid it
    names one process, even after the pid is reused."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""  # Field 22 of proc(5).


def _machine() -> str:
    """This boot of this kernel and this pid namespace ('' if unknown): pids mean the same
    process only between processes with the same value (containers on one host share the
    host name and boot id, not pids)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}/{namespace}" if boot else ""


def _holder_record(token: str, heartbeat: float | None) -> dict[str, Any]:
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "process_start": _process_start(os.getpid()),
        "machine": _machine(),
        "token": token,
    }
    if heartbeat is not None:
        record["heartbeat_seconds"] = heartbeat
    return record


def _parse(data: bytes | str) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict[str, Any]) -> str:
    if not record.get("host"):
        return "an unknown holder (the lock names none)"
    return (
        f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started', '?')}"
    )


def _gone_from_this_machine(record: dict[str, Any]) -> bool:
    """Whether the holder ran on this machine (host, boot, pid namespace) and has ended."""
    machine = _machine()
    here = record.get("host") == socket.gethostname() and record.get("machine") == machine
    if not machine or not here:
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return _process_start(pid) != record.get("process_start")


class _LocalLock:
    """An exclusive flock on `<workdir>/.lock`, held while the file descriptor is open."""

    def __init__(self, workdir: epath.Path):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = self._holder(fd)
                os.close(fd)
                raise WorkdirLockedError(self._message(record)) from None
            try:  # The holder before us may have deleted the file as we opened it.
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder_record(uuid.uuid4().hex, None)) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def _holder(self, fd: int) -> dict[str, Any]:
        for _ in range(20):  # The holder writes its record just after locking.
            record = _parse(os.pread(fd, 4096, 0))
            if record:
                return record
            time.sleep(0.01)
        return {}

    def _message(self, record: dict[str, Any]) -> str:
        return (
            f"The workdir {os.path.dirname(self.path)} is held by another job "
            f"({_describe(record)}): "
            "two jobs on one workdir would both write its checkpoints, caches and metrics. "
            "Wait for that job to end or stop it (kill its pid), or give this job another "
            f"--workdir. The lock is an flock on {self.path}, which ends with its process; "
            "if that process is on another host of a shared filesystem that is gone, "
            f"remove it by hand: rm {self.path}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # Before unlocking: a waiter then finds the file gone.
        os.close(self._fd)
        self._fd = None


class _GcsLock:
    """`<workdir>/.lock` on gs://, created and refreshed with generation preconditions."""

    def __init__(self, workdir: epath.Path, heartbeat: float):
        self.path = f"{os.fspath(workdir).rstrip('/')}/{LOCK_FILE}"
        self.heartbeat = heartbeat
        self._token = uuid.uuid4().hex
        self._data = (json.dumps(_holder_record(self._token, heartbeat)) + "\n").encode()
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> None:
        expected = 0  # No object.
        for _ in range(10):
            try:
                self._generation = paths.write_if_generation(self.path, self._data, expected)
                break
            except paths.GenerationMismatch:
                pass
            current = paths.read_object_version(self.path)
            if current is None:  # Released since: create again.
                expected = 0
                continue
            record = _parse(current.data)
            if record.get("token") == self._token:  # Our own write, retried after a timeout.
                self._generation = current.generation
                break
            stale = self._staleness(record, current)
            if stale is None:
                raise WorkdirLockedError(self._message(record, current))
            logging.warning(
                "Taking over the lock of %s from %s: %s.", self.path, _describe(record), stale
            )
            expected = current.generation  # Of two rerunners, only one matches it.
        else:
            raise WorkdirLockedError(f"Could not take {self.path}: it kept changing; retry.")
        self._thread = threading.Thread(
            target=self._beat, name=f"workdir lock {self.path}", daemon=True
        )
        self._thread.start()

    def _staleness(self, record: dict[str, Any], current: paths.ObjectVersion) -> str | None:
        """Why the lock is stale, or None while its holder may live."""
        if _gone_from_this_machine(record):
            return f"its process ({record.get('pid')}) on this machine has ended"
        period = record.get("heartbeat_seconds")
        period = period if isinstance(period, int | float) and period > 0 else DEFAULT_HEARTBEAT_S
        age = current.server_time - current.updated
        if age > STALE_HEARTBEATS * period:
            return f"no heartbeat for {age:.0f} s (one every {period:g} s)"
        return None

    def _message(self, record: dict[str, Any], current: paths.ObjectVersion) -> str:
        period = record.get("heartbeat_seconds", DEFAULT_HEARTBEAT_S)
        age = max(0.0, current.server_time - current.updated)
        return (
            f"The workdir {self.path.rpartition('/')[0]} is held by another job "
            f"({_describe(record)}; last heartbeat {age:.0f} s ago): two jobs on one workdir "
            "would both write its checkpoints, caches and metrics. Wait for that job to end "
            "or stop it, or give this job another --workdir. A holder that died is "
            f"recognised by itself once it has missed {STALE_HEARTBEATS} heartbeats "
            f"(one every {period} s); to clear the lock by hand, once you know that job is "
            f"gone: gcloud storage rm {self.path}"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._generation = paths.write_if_generation(
                    self.path, self._data, self._generation
                )
            except paths.GenerationMismatch:
                current = paths.read_object_version(self.path)
                if current is not None and _parse(current.data).get("token") == self._token:
                    self._generation = current.generation  # Our write whose answer was lost.
                    continue
                self.lost = True
                logging.error(
                    "Lost the lock of %s: another job took it over after this one missed its "
                    "heartbeats (%s). Two jobs may now write this workdir; stop one.",
                    self.path,
                    "deleted" if current is None else _describe(_parse(current.data)),
                )
                return
            except Exception as error:  # Transient: the next period tries again.
                logging.warning("Workdir lock heartbeat on %s failed: %s", self.path, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self._generation is None:
            return
        try:
            # Looked at first too: not every store honours the precondition on deletes (the
            # local emulator does not), and a lock taken over since is the new holder's.
            current = paths.read_object_version(self.path)
            if current is None or current.generation != self._generation:
                raise paths.GenerationMismatch(self.path)
            paths.delete_if_generation(self.path, self._generation)
        except paths.GenerationMismatch:
            logging.error("The lock %s was taken over by another job; left to it.", self.path)
        except Exception as error:  # The job's own outcome matters more than the cleanup.
            logging.warning(
                "Could not delete the lock %s (%s); it goes stale by itself.", self.path, error
            )
        self._generation = None


def WorkdirLock(workdir: epath.PathLike):  # noqa: N802 (a class to its callers)
    """The lock of one workdir, not yet taken: `.acquire()` (raises `WorkdirLockedError`),
    `.release()`, `.path`. `hold` is the re-entrant, multi-process way to use it."""
    workdir = paths.resolve(workdir)
    if paths.scheme(workdir) == "gs":
        return _GcsLock(workdir, heartbeat_seconds())
    if paths.is_remote(workdir):
        raise ValueError(f"Workdirs are local or gs://; got {workdir}.")
    return _LocalLock(workdir)


def _take(key: str, workdir: epath.Path) -> None:
    """Process 0's part of `hold`: the lock, or one more depth of one held already."""
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return
        lock = WorkdirLock(workdir)
        lock.acquire()
        _HELD[key] = [lock, 1]
        logging.info("Holding the workdir %s (%s).", workdir, lock.path)


def _drop(key: str) -> None:
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            entry[0].release()


@contextlib.contextmanager
def hold(workdir: epath.PathLike) -> Iterator[epath.Path]:
    """Holds `workdir` for this job while the block runs (see the module docstring).

    Every process of a job calls it; process 0 takes the lock.

    Args:
      workdir: Local path or gs://bucket/path (a local one is created if missing).

    Yields:
      The workdir, resolved (`paths.resolve`).

    Raises:
      WorkdirLockedError: If another live job holds it (on process 0; the other processes
        raise a RuntimeError pointing to process 0's log).
    """
    workdir = paths.resolve(workdir)
    key = os.fspath(workdir).rstrip("/")
    parallel.on_main_process(_take, key, workdir)
    try:
        yield workdir
    finally:
        if parallel.is_main_process():
            _drop(key)


def holds(workdir: epath.PathLike) -> bool:
    """Whether this process holds `workdir` (process 0 of a multi-process job)."""
    return os.fspath(paths.resolve(workdir)).rstrip("/") in _HELD


def holding(run):
    """Decorates a job's `run(config, workdir, ...)` to hold `workdir` while it runs."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def held(*args, **kwargs):
        workdir = signature.bind(*args, **kwargs).arguments["workdir"]
        with hold(workdir):
            return run(*args, **kwargs)

    return held
