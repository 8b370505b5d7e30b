"""Tests for interp/metrics.py: JSON lines, TensorBoard events, the progress line."""

import json
import logging
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from interp import metrics
from tests import references, runs


def _read_scalars(tb_dir):
    """{tag: [(step, value)]} from every event file in `tb_dir`, in wall-time order."""
    events = []
    files = sorted(p for p in epath.Path(tb_dir).iterdir() if "tfevents" in p.name)
    assert files, f"no event file in {tb_dir}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            # uint64 length, uint32 crc of length, payload, uint32 crc of payload.
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            events.append(event_pb2.Event.FromString(payload))
    scalars = {}
    for event in sorted(events, key=lambda e: e.wall_time):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_and_tensorboard_local(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": jnp.asarray(3.5), "lr": np.float32(1e-3), "tokens": 4096})
        writer.write(2, {"loss": 3.25, "finite": jnp.asarray(True)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 3.5 and records[0]["tokens"] == 4096
    assert records[0]["lr"] == pytest.approx(1e-3)
    assert records[1] == {
        "step": 2,
        "wall_time": records[1]["wall_time"],
        "loss": 3.25,
        "finite": True,
    }
    assert records[0]["wall_time"] <= records[1]["wall_time"]
    scalars = _read_scalars(tmp_path / "tb")
    assert scalars["loss"] == [(1, 3.5), (2, 3.25)]
    assert scalars["tokens"] == [(1, 4096.0)]


def test_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
    # A fresh process (this one has torch already): tensorboardX imports torch where it is
    # installed, ~1.2 s a job process for nothing; the writer keeps it out, and a later
    # `import torch` still works.
    references.require_module("torch", "pip install -e .[test] torch==2.13.0")
    script = textwrap.dedent(
        f"""
        import sys
        from interp import metrics
        with metrics.MetricWriter({str(tmp_path)!r}) as writer:
            writer.write(1, {{"loss": 2.5}})
        print("torch" in sys.modules)
        import torch
        print(torch.ones(2).sum().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=runs.ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "2.0"]
    assert _read_scalars(tmp_path / "tb") == {"loss": [(1, 2.5)]}


def test_resumed_writer_appends(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.5})
    # A run killed mid-write leaves a torn last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with metrics.MetricWriter(tmp_path) as writer:  # Resumed from the step-1 checkpoint.
        writer.write(2, {"loss": 1.25})
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == [
        (1, 2.0),
        (2, 1.5),
        (2, 1.25),
    ]
    deduped = metrics.read_metrics(tmp_path, dedupe=True)
    assert [(r["step"], r["loss"]) for r in deduped] == [(1, 2.0), (2, 1.25)]
    # Two event files (one per run, even within the same second), both readable.
    assert len(list((tmp_path / "tb").iterdir())) == 2
    assert _read_scalars(tmp_path / "tb")["loss"] == [(1, 2.0), (2, 1.5), (2, 1.25)]


def test_gcs_writer_rewrites_and_resumes(gcs_bucket):
    workdir = epath.Path(gcs_bucket) / "run"
    writer = metrics.MetricWriter(workdir, flush_every_secs=3600)
    writer.write(1, {"loss": 2.0})
    writer.flush()
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1]
    writer.write(2, {"loss": 1.0})
    writer.close()
    with metrics.MetricWriter(workdir) as writer:
        writer.write(3, {"loss": 0.5})
    assert [r["loss"] for r in metrics.read_metrics(workdir)] == [2.0, 1.0, 0.5]
    assert [v for _, v in _read_scalars(workdir / "tb")["loss"]] == [2.0, 1.0, 0.5]


def test_bad_metrics_are_refused(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'acts' must be a scalar, got shape \\(3,\\)"):
            writer.write(1, {"acts": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 1})
        with pytest.raises(ValueError, match="must be a number"):
            writer.write(1, {"name": "x"})
    assert not (tmp_path / "tb").exists()


def test_disabled_writer_writes_nothing(tmp_path):
    with metrics.MetricWriter(tmp_path / "w", enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists()


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_and_eta():
    clock = _Clock()
    progress = metrics.Progress(1000, tokens_per_step=10_400, clock=clock, log=False)
    clock.now += 30.0  # The first update includes 30 s of compilation...
    line = progress.update(10, loss=3.5)
    assert line == "step 10/1000 (1%) | -- tok/s | loss 3.5 | elapsed 0:30 | ETA --"
    clock.now += 10.0  # ...which the rate leaves out: 110 steps in 10 s.
    line = progress.update(120, loss=jnp.asarray(3.2141), grad_norm=np.float32(0.5))
    # 11 steps/s * 10.4k tokens = 114.4k tok/s; 880 steps left / 11 = 80 s.
    assert line == (
        "step 120/1000 (12%) | 114k tok/s | loss 3.214 | grad_norm 0.5 | elapsed 0:40 | ETA 1:20"
    )


def test_progress_rate_uses_recent_window():
    clock = _Clock()
    progress = metrics.Progress(10_000, tokens_per_step=1000, clock=clock, window=2, log=False)
    progress.update(1)
    for step in range(2, 5):  # Slow: 1 step/s.
        clock.now += 1.0
        progress.update(step)
    for step in range(5, 7):  # Fast: 4 steps/s; the window holds only these two updates.
        clock.now += 0.25
        line = progress.update(step)
    assert progress.steps_per_second() == pytest.approx(4.0)
    assert "4k tok/s" in line
    # 9994 steps at 4 steps/s = 2498.5 s = 41:38 (rounded to the second).
    assert line.endswith("ETA 41:38")


def test_progress_hours_and_steps_per_second():
    clock = _Clock()
    progress = metrics.Progress(
        100_000, tokens_per_step=None, start_step=50, clock=clock, log=False
    )
    progress.update(50)  # The restored state, before any step: not timed.
    clock.now += 20.0
    progress.update(51)  # Compilation.
    clock.now += 2.0
    line = progress.update(52)
    # 0.5 steps/s; 99,948 steps left = 199,896 s = 55:31:36.
    assert line == "step 52/100000 (0%) | 0.5 steps/s | elapsed 0:22 | ETA 55:31:36"


def test_progress_window_restarts_when_steps_go_back():
    clock = _Clock()
    progress = metrics.Progress(100, tokens_per_step=10, clock=clock, log=False)
    for step in (1, 2, 3):
        clock.now += 1.0
        progress.update(step)
    clock.now += 100.0  # Restored step 1 again: the wait and recompile are not timed.
    progress.update(2)
    assert progress.steps_per_second() is None
    clock.now += 0.5
    progress.update(3)
    assert progress.steps_per_second() == pytest.approx(2.0)


def test_progress_logs(caplog):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    with caplog.at_level("INFO"):
        line = metrics.Progress(10, 1, clock=_Clock()).update(1, loss=1.0)
    assert line in caplog.text


@pytest.mark.parametrize(
    "seconds, text", [(0, "0:00"), (40.4, "0:40"), (293, "4:53"), (3723, "1:02:03")]
)
def test_format_duration(seconds, text):
    assert metrics._format_duration(seconds) == text


@pytest.mark.parametrize(
    "rate, text", [(950, "950"), (31_200, "31.2k"), (1_250_000, "1.25M"), (2.5e9, "2.5G")]
)
def test_format_rate(rate, text):
    assert metrics._format_rate(rate) == text


def test_tracked_logs_rate_and_eta_every_few_seconds_and_at_each_pass_end(caplog):
    now = [0.0]
    items = list(range(10))
    tracked = metrics.Tracked(items, "influence: factors", 100, seconds=10.0,
                              clock=lambda: now[0])  # fmt: skip
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            for _ in tracked:
                now[0] += 4.0  # 4 s an item: a line every third item.
    lines = [r.getMessage() for r in caplog.records if "influence: factors" in r.getMessage()]
    first = [line for line in lines if "pass 2" not in line]
    assert len(tracked) == 10 and len(first) == 4 and len(lines) == 8
    assert first[0].startswith("influence: factors: batch 3/10 (30%) | 25 tok/s")
    assert first[-1].startswith("influence: factors: batch 10/10 (100%) | 25 tok/s")
    assert "ETA 0:00" in first[-1]
    assert lines[-1].startswith("influence: factors, pass 2: batch 10/10")
