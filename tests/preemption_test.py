"""Preemption: real experiment mains killed midway by real signals resume to the same result.

Each test starts `python -m experiments.X` as a subprocess, waits until its own output (or
its checkpoint folder) shows it is midway, signals it, and reruns the same command. Results
are compared exactly: on CPU the resumed run computes the same float32 operations in the
same order as the uninterrupted one.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy

from interp import preemption
from interp.data import cache as cache_lib
from tests import runs
from tests.runs import ROOT

TINY = "configs/demo.py:tiny=True"
# A longer tiny LM run, one progress line per step, so there is a midway to stop at.
LM_FLAGS = runs.flags(**{"train.steps": 120, "log_every": 1, "eval_every": 0,
                         "checkpoint_every": 40})  # fmt: skip


class Run:
    """A main running as a subprocess; its stderr is collected line by line as it comes."""

    def __init__(self, module: str, workdir: str, *extra: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, f"--config={TINY}", f"--workdir={workdir}", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(
            target=lambda: self._stdout.extend(self.process.stdout), daemon=True
        ).start()

    def _read(self):
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append(None)  # End of output.
            self._changed.notify_all()

    def wait_for(self, condition, timeout: float = 300):
        """Blocks until `condition()` holds (checked on each new line and every 0.05 s)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                if None in self.lines:
                    pytest.fail(f"The run ended first:\n{self.stderr[-3000:]}")
                if time.monotonic() > deadline:
                    self.process.kill()
                    pytest.fail(f"Timed out waiting:\n{self.stderr[-3000:]}")
                self._changed.wait(0.05)

    def step(self) -> int:
        """The last step its progress lines reported (0 before the first)."""
        found = [int(m.group(1)) for line in self.lines if line for m in [_STEP.search(line)] if m]
        return found[-1] if found else 0

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self.wait_for(lambda: None in self.lines, timeout=30)
        return code

    @property
    def stderr(self) -> str:
        return "".join(line for line in self.lines if line)


_STEP = re.compile(r"step (\d+)/\d+ \(")


def _run_to_end(module, workdir, *extra):
    run = Run(module, workdir, *extra)
    assert run.finish() == 0, run.stderr[-3000:]
    return run


def _checkpoints(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _lm_result(workdir):
    weights = safetensors.numpy.load_file(os.path.join(workdir, "export", "model.safetensors"))
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return weights, {k: summary[k] for k in ("step", "eval_loss", "sample")}


def _assert_same_lm(got_dir, want_dir):
    (got, got_summary), (want, want_summary) = _lm_result(got_dir), _lm_result(want_dir)
    assert got.keys() == want.keys()
    for name in want:  # Exact: same operations in the same order on CPU.
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got_summary == want_summary


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory):
    """The uninterrupted run the interrupted ones must end equal to."""
    workdir = str(tmp_path_factory.mktemp("lm_reference"))
    _run_to_end("experiments.train_lm", workdir, *LM_FLAGS)
    return workdir


def test_lm_killed_then_preempted_resumes_to_the_uninterrupted_result(lm_reference, tmp_path):
    workdir = str(tmp_path / "lm")
    # 1. SIGKILL once the step-40 checkpoint is committed (its folder renamed into place):
    # nothing runs on the way out, so the rerun starts from the last periodic checkpoint.
    run = Run("experiments.train_lm", workdir, *LM_FLAGS)
    folder = os.path.join(workdir, "checkpoints", "40")
    run.wait_for(lambda: os.path.isdir(folder) and run.step() > 40)
    run.process.kill()
    assert run.finish() == -signal.SIGKILL
    resumed_from = _checkpoints(workdir)[-1]
    assert resumed_from in (40, 80)  # 80 only if it got that far meanwhile.

    # 2. The rerun resumes there; SIGTERM a few steps later: it saves the step it reached,
    # waits for the save to commit, says so and exits with 128 + SIGTERM.
    run = Run("experiments.train_lm", workdir, *LM_FLAGS)
    run.wait_for(lambda: run.step() >= resumed_from + 3)
    assert f"Resumed LM training from step {resumed_from} of 120" in run.stderr
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.stderr[-3000:]
    stopped = re.search(r"preempted \(SIGTERM\) at step (\d+) of 120; rerun the same", run.stderr)
    assert stopped, run.stderr[-3000:]
    step = int(stopped.group(1))
    assert resumed_from + 3 <= step < 120
    assert "Traceback" not in run.stderr
    assert step in _checkpoints(workdir)  # Saved and committed before the exit.
    assert not os.path.exists(os.path.join(workdir, "export"))  # Stopped before the end.

    # 3. The last rerun goes on from that step to the end: the same weights, loss and sample.
    again = _run_to_end("experiments.train_lm", workdir, *LM_FLAGS)
    assert f"Resumed LM training from step {step} of 120" in again.stderr
    _assert_same_lm(workdir, lm_reference)


def test_preempted_carries_the_shell_exit_code():
    stopped = preemption.Preempted(7, 10, signal.SIGINT, "SAE training")
    assert stopped.exit_code == 130
    assert str(stopped) == (
        "SAE training preempted (SIGINT) at step 7 of 10; rerun the same command to resume."
    )


# The SAE job's harvest. The tiny LM harvests ~500k rows/s, too fast to stop midway; a wider
# one (d_model 256, one training step: only its speed matters) takes a few seconds for the
# 40k rows asked for here, with a progress commit every 0.2 s to stop after.
WIDE_LM_FLAGS = runs.flags(**{
    "model.d_model": 256, "model.num_heads": 4, "model.head_dim": 64, "model.mlp_dim": 1024,
    "train.steps": 1, "train.warmup_steps": 0, "checkpoint_every": 1, "eval_every": 0,
})  # fmt: skip
HARVEST_ROWS = 40_000


def _sae_flags(lm_workdir):
    return runs.flags(**{
        "sae.model_path": os.path.join(lm_workdir, "export"),
        "sae.harvest_rows": HARVEST_ROWS, "sae.harvest_commit_seconds": 0.2,
    })  # fmt: skip


_COMMITTED = re.compile(r"Harvest progress: (\d+) of \d+ rows committed")


def _committed(run) -> int:
    """The rows of the last progress commit the run reported (0 before the first)."""
    found = [int(m.group(1)) for line in run.lines if line for m in [_COMMITTED.search(line)] if m]
    return found[-1] if found else 0


def _files(folder) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _assert_same_files(got, want):
    got_files, want_files = _files(got), _files(want)
    assert sorted(got_files) == sorted(want_files)
    for name, data in want_files.items():
        assert got_files[name] == data, name  # Bitwise.


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("wide_lm"))
    _run_to_end("experiments.train_lm", workdir, *WIDE_LM_FLAGS)
    return workdir


def test_sae_harvest_killed_then_preempted_resumes_to_the_uninterrupted_cache(wide_lm, tmp_path):
    flags = _sae_flags(wide_lm)
    # The uninterrupted reference runs meanwhile (it also slows the harvests down).
    reference = Run("experiments.train_sae", str(tmp_path / "reference"), *flags)
    workdir = str(tmp_path / "sae")
    cache = os.path.join(workdir, "activations")

    # 1. SIGKILL after the first progress commit: the cache stays incomplete, its progress
    # record says how far it is written.
    run = Run("experiments.train_sae", workdir, *flags)
    run.wait_for(lambda: _committed(run) > 0)
    run.process.kill()
    assert run.finish() == -signal.SIGKILL
    killed_at = cache_lib.progress(cache)["rows"]
    assert 0 < killed_at < HARVEST_ROWS
    assert not cache_lib.is_complete(cache)
    with pytest.raises(ValueError, match="incomplete"):
        cache_lib.ActivationCache.open(cache)

    # 2. The rerun continues from there; SIGTERM after its first commit: it commits the rows
    # of the batches done and exits with 128 + SIGTERM.
    run = Run("experiments.train_sae", workdir, *flags)
    run.wait_for(lambda: _committed(run) > killed_at)
    assert f"Continuing the activation cache at {cache} after {killed_at} rows" in run.stderr
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.stderr[-3000:]
    stopped = re.search(
        rf"The harvest preempted \(SIGTERM\) at row (\d+) of {HARVEST_ROWS}; rerun the same",
        run.stderr,
    )
    assert stopped, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    preempted_at = int(stopped.group(1))
    assert killed_at < preempted_at < HARVEST_ROWS
    assert cache_lib.progress(cache)["rows"] == preempted_at  # Committed before the exit.
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # No training yet.

    # 3. The last rerun harvests the rest, trains and evaluates: the cache's files, the SAEs
    # and their evaluation are those of the uninterrupted run, bit for bit.
    again = _run_to_end("experiments.train_sae", workdir, *flags)
    assert f"Continuing the activation cache at {cache} after {preempted_at} rows" in again.stderr
    assert reference.finish() == 0, reference.stderr[-3000:]
    want = str(tmp_path / "reference")
    _assert_same_files(cache, os.path.join(want, "activations"))
    _assert_same_files(os.path.join(workdir, "saes"), os.path.join(want, "saes"))
    with open(os.path.join(workdir, "eval.json")) as a, open(os.path.join(want, "eval.json")) as b:
        assert json.load(a) == json.load(b)
