"""interp/jobs/lock.py: one job per workdir, local and gs://, with real processes.

Jobs run as real subprocesses (`tests/jobs/lock_holder.py`, a main that only holds its
workdir through experiments/common.run, as every experiment main does); gs:// workdirs live
on the local GCS emulator.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from experiments import common
from interp import paths
from interp.jobs import analyse, influence, lm, sae, steer
from interp.jobs import lock as lock_lib
from tests import multiprocess
from tests.runs import ROOT


class Holder:
    """`python -m tests.jobs.lock_holder --workdir=W` as a subprocess."""

    def __init__(self, workdir: str, **env: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.lock_holder", f"--workdir={workdir}"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **env},
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.process.stdout, self.stdout),
                              (self.process.stderr, self.stderr)):  # fmt: skip
            threading.Thread(target=lambda s=stream, x=lines: x.extend(s), daemon=True).start()

    def wait_for(self, text: str, where: str = "stdout", timeout: float = 120) -> None:
        lines = self.stdout if where == "stdout" else self.stderr
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(lines)):
            if self.process.poll() is not None and not any(text in x for x in list(lines)):
                time.sleep(0.2)  # The reader threads may still be catching up.
                if not any(text in line for line in list(lines)):
                    pytest.fail(f"Ended ({self.process.returncode}) before {text!r}:\n{self.log}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"No {text!r} in time:\n{self.log}")
            time.sleep(0.05)

    def release(self, timeout: float = 60) -> int:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self.finish(timeout)

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.1)  # Let the reader threads drain.
        return code

    @property
    def log(self) -> str:
        return "".join(self.stderr)[-4000:]


def _run_second(workdir: str, **env: str) -> tuple[int, str, float]:
    """A second job on `workdir`, its stdin closed: (exit code, stderr, seconds taken)."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tests.jobs.lock_holder", f"--workdir={workdir}"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )  # fmt: skip
    return result.returncode, result.stderr, time.monotonic() - start


def _lock_exists(workdir: str) -> bool:
    path = f"{workdir}/{lock_lib.LOCK_FILE}"
    if paths.scheme(workdir) == "gs":
        return paths.read_object_version(path) is not None
    return os.path.exists(path)


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
    if request.param == "gs":
        return f"{request.getfixturevalue('gcs_bucket')}/runs/a"
    return str(tmp_path / "runs" / "a")


def test_a_second_job_on_a_held_workdir_exits_naming_the_holder(workdir):
    holder = Holder(workdir)
    holder.wait_for("holding")
    code, stderr, seconds = _run_second(workdir)
    assert code == common.LOCKED_EXIT_CODE, stderr[-3000:]
    message = stderr
    assert f"The workdir {workdir} is held by another job" in message
    assert f"host {socket.gethostname()}, pid {holder.process.pid}, started 20" in message
    if workdir.startswith("gs://"):
        assert f"gcloud storage rm {workdir}/.lock" in message
    else:
        assert f"rm {workdir}/.lock" in message
        with open(f"{workdir}/metrics.jsonl") as f:  # Only the holder wrote.
            assert [json.loads(line)["pid"] for line in f] == [holder.process.pid]
    assert "Traceback" not in stderr
    assert seconds < 60  # Refused before any work (the job itself would wait forever).
    # The library entry points refuse it too, before writing anything.
    for run in (lm.run, sae.run, influence.fit, influence.run, analyse.run, steer.run):
        with pytest.raises(lock_lib.WorkdirLockedError, match=f"pid {holder.process.pid}"):
            run(None, workdir)
    assert not paths.resolve(f"{workdir}/config.json").exists()
    assert holder.release() == 0, holder.log
    assert not _lock_exists(workdir)  # Released at a normal exit.


def test_a_killed_holders_lock_does_not_block_the_rerun(workdir):
    holder = Holder(workdir)
    holder.wait_for("holding")
    holder.process.kill()  # SIGKILL: nothing of the job runs again.
    assert holder.finish() == -signal.SIGKILL
    if workdir.startswith("gs://"):
        assert _lock_exists(workdir)  # Locally the file may stay too, but nothing holds it.
    rerun = Holder(workdir)  # gs://: its holder ran on this machine and is gone.
    rerun.wait_for("holding")
    # SIGTERM outside a loop that catches it (loading, exporting) still releases the lock.
    rerun.process.terminate()
    assert rerun.finish() == 128 + signal.SIGTERM, rerun.log
    assert not _lock_exists(workdir)


@pytest.mark.gcs_timeout(120)
def test_gs_heartbeats_keep_a_live_lock_and_a_frozen_holder_loses_it(gcs_bucket):
    workdir = f"{gcs_bucket}/runs/b"
    fast = {lock_lib.HEARTBEAT_ENV: "0.3"}  # Stale after 4 x 0.3 s without a heartbeat.
    holder = Holder(workdir, **fast)
    holder.wait_for("holding")
    time.sleep(2.0)  # Several stale periods: the heartbeats keep it held.
    code, stderr, _ = _run_second(workdir, **fast)
    assert code == common.LOCKED_EXIT_CODE and "last heartbeat 0 s ago" in stderr, stderr[-3000:]
    holder.process.send_signal(signal.SIGSTOP)  # Alive, but silent: a hung or cut-off VM.
    try:
        time.sleep(2.0)
        rerun = Holder(workdir, **fast)  # Takes the stale lock over.
        rerun.wait_for("holding")
        assert any("Taking over the lock" in line for line in rerun.stderr), rerun.log
    finally:
        holder.process.send_signal(signal.SIGCONT)
    holder.wait_for("Lost the lock", where="stderr")
    assert holder.release() == 0, holder.log
    held = json.loads(paths.read_object_version(f"{workdir}/.lock").data)
    assert held["pid"] == rerun.process.pid  # The old holder left the new one's lock alone.
    assert rerun.release() == 0, rerun.log
    assert not _lock_exists(workdir)


@pytest.mark.parametrize("stale", [False, True])
def test_of_racers_on_one_workdir_exactly_one_wins(workdir, stale):
    """Eight concurrent takers (threads: the store or the kernel decides, not this process)."""
    if stale:  # A lock whose holder on another host stopped its heartbeats long ago.
        record = {"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00",
                  "heartbeat_seconds": 0.05, "token": "old"}  # fmt: skip
        if workdir.startswith("gs://"):
            paths.write_if_generation(f"{workdir}/.lock", json.dumps(record).encode(), 0)
            time.sleep(0.5)
        else:  # Locally nobody holds its flock: a leftover file.
            os.makedirs(workdir)
            with open(f"{workdir}/.lock", "w") as f:
                json.dump(record, f)
    locks = [lock_lib.WorkdirLock(workdir) for _ in range(8)]
    start = threading.Barrier(len(locks))
    results = [None] * len(locks)

    def take(i):
        start.wait()
        try:
            locks[i].acquire()
            results[i] = "won"
        except lock_lib.WorkdirLockedError:
            results[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == ["refused"] * 7 + ["won"]
    locks[results.index("won")].release()
    assert not _lock_exists(workdir)


def test_holding_is_reentrant_and_stages_under_a_held_workdir_take_their_own(tmp_path):
    top = str(tmp_path / "pipeline")
    with lock_lib.hold(top):
        with lock_lib.hold(top):  # The main holds --workdir; the job's run() again.
            assert lock_lib.holds(top)
        assert lock_lib.holds(top) and os.path.exists(f"{top}/.lock")
        with lock_lib.hold(f"{top}/lm"):  # A stage: its own lock, no wait on the pipeline's.
            assert os.path.exists(f"{top}/lm/.lock")
        assert not os.path.exists(f"{top}/lm/.lock")
    assert not lock_lib.holds(top) and not os.path.exists(f"{top}/.lock")


def test_a_bad_heartbeat_setting_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv(lock_lib.HEARTBEAT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{lock_lib.HEARTBEAT_ENV}='soon'"):
        lock_lib.heartbeat_seconds()


def test_a_multi_process_job_on_a_held_workdir_stops_in_every_process(tmp_path):
    workdir = str(tmp_path / "runs" / "c")
    holder = Holder(workdir)
    holder.wait_for("holding")
    address = f"127.0.0.1:{multiprocess.free_port()}"
    processes = [
        subprocess.Popen(
            [
                "timeout",
                "-k",
                "5",
                "120",
                sys.executable,
                "-m",
                "tests.jobs.lock_holder",
                f"--workdir={workdir}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, XLA_FLAGS=multiprocess.xla_flags(2)),
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=150)[0] for process in processes]
    # Process 0 took nothing and says why; process 1 never went on without it.
    assert processes[0].returncode == common.LOCKED_EXIT_CODE, outputs[0][-3000:]
    assert f"pid {holder.process.pid}" in outputs[0], outputs[0][-3000:]
    assert processes[1].returncode not in (0, None), outputs[1][-3000:]
    assert "Process 0 failed" in outputs[1], outputs[1][-3000:]
    assert not any(re.search(r"^holding \d+$", output, re.M) for output in outputs)
    assert holder.release() == 0, holder.log


def test_a_held_workdir_with_only_its_config_still_takes_a_corrected_config(tmp_path):
    # The lock file is no work: a run that failed after saving its config (a mistyped model
    # path) is rerun corrected inside the same held workdir, not refused as changed.
    from interp.jobs import workdir as workdir_lib

    workdir = str(tmp_path / "run")
    with lock_lib.hold(workdir):
        workdir_lib.prepare_workdir({"model_path": "typo"}, workdir)
        workdir_lib.prepare_workdir({"model_path": "right"}, workdir)
    with open(f"{workdir}/config.json") as f:
        assert json.load(f) == {"model_path": "right"}
