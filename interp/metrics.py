"""Training metrics: JSON lines plus TensorBoard scalars, and a one-line progress report.

    writer = MetricWriter(workdir)
    progress = Progress(config.steps, tokens_per_step=config.batch_tokens, start_step=step)
    for step in range(step + 1, config.steps + 1):
        ...
        if step % config.log_every == 0:
            writer.write(step, {"loss": loss, "lr": lr})
            progress.update(step, loss=loss)  # Logs 'step 120/1000 (12%) | 31.2k tok/s | ...'
    writer.close()

`metrics.jsonl` holds one object per `write`: `{"step": 120, "wall_time": 1.7e9, "loss": 3.2}`
(non-finite values are written as Python's json writes them: `NaN`, `Infinity`). A resumed run
appends to the same file, so steps between the last checkpoint and a crash appear twice;
`read_metrics(..., dedupe=True)` keeps the later record of each step.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from interp import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
_RESERVED = ("step", "wall_time")


def _to_scalar(name: str, value: Any) -> int | float | bool:
    """A Python number from a Python/NumPy/JAX scalar, or a clear error."""
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
    if array.dtype.kind == "b":
        return bool(array)
    if array.dtype.kind in "iu":
        return int(array)
    if jnp.issubdtype(array.dtype, jnp.floating):  # Includes bfloat16.
        return float(array)
    raise ValueError(f"Metric {name!r} must be a number, got {value!r} ({array.dtype}).")


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`.

    Local workdirs: each `write` appends one line and flushes it, so a crash loses nothing.
    `gs://` workdirs: objects cannot be appended to, so the writer reads any existing file at
    start, keeps all lines in memory and rewrites the whole object on `flush()`, `close()`,
    and from `write` once `flush_every_secs` have passed since the last upload (a crash loses
    at most that much). Metric files stay small (a few MB for 100k writes), so this is cheap.
    The TensorBoard event files are handled the same way (see `_RemoteEventFile`).

    Only process 0 writes in multi-process runs (others get a writer that does nothing), so
    every process can call it unconditionally.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        tensorboard: bool = True,
        flush_every_secs: float = 30.0,
        enabled: bool | None = None,
    ):
        """Opens (creating if needed) the metric files under `workdir`.

        Args:
          workdir: Local path or `gs://bucket/path`.
          tensorboard: Also write TensorBoard scalars.
          flush_every_secs: On gs://, upload at most this often from `write`; also the
            TensorBoard writer's flush interval.
          enabled: Whether to write at all; defaults to `jax.process_index() == 0`.
        """
        self.workdir = paths.resolve(workdir)
        self.path = self.workdir / METRICS_FILE
        self._enabled = jax.process_index() == 0 if enabled is None else enabled
        self._flush_every_secs = flush_every_secs
        self._file = None  # Local: an open append-mode file.
        self._lines: list[str] = []  # gs://: every line, rewritten on flush.
        self._dirty = False
        self._last_flush = time.monotonic()
        self._tensorboard = None
        self._closed = False
        if not self._enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not paths.is_remote(self.path):
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell() > 0 and not _ends_with_newline(self.path):
                self._file.write("\n")  # A crash cut the last line short: keep the next whole.
        elif self.path.exists():
            text = self.path.read_text()
            self._lines = [line + "\n" for line in text.splitlines() if line.strip()]
        if tensorboard:
            tensorboardX = _import_tensorboardx()

            if paths.is_remote(self.workdir):
                _register_remote_event_files(self.workdir)

            # A unique suffix: tensorboardX names files by the second, and a second writer
            # in the same second would truncate the first one's file.
            self._tensorboard = tensorboardX.SummaryWriter(
                os.fspath(self.workdir / TENSORBOARD_DIR),
                flush_secs=flush_every_secs,
                filename_suffix=f".{uuid.uuid4().hex[:8]}",
            )

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (name -> Python/NumPy/JAX scalar) at `step`.

        Raises:
          ValueError: On a non-scalar value, or a name that clashes with `step`/`wall_time`.
        """
        if self._closed:
            raise RuntimeError(f"MetricWriter for {self.workdir} is closed.")
        if not self._enabled:
            return
        wall_time = time.time()
        record: dict[str, Any] = {"step": int(step), "wall_time": wall_time}
        for name, value in scalars.items():
            if name in _RESERVED:
                raise ValueError(f"Metric name {name!r} is reserved in {METRICS_FILE}.")
            record[name] = _to_scalar(name, value)
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._last_flush >= self._flush_every_secs:
                self.flush()
        if self._tensorboard is not None:
            for name, value in record.items():
                if name not in _RESERVED:
                    self._tensorboard.add_scalar(name, value, int(step), walltime=wall_time)

    def flush(self) -> None:
        """Makes everything written so far durable (uploads it on gs://)."""
        if not self._enabled or self._closed:
            return
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        elif self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the files. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._closed = True

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _RemoteEventFile:
    """A tensorboardX event file on gs:// (any epath URL): held in memory, rewritten on flush.

    Replaces tensorboardX's own gs:// writer, which talks to GCS through google-cloud-storage
    (a second client with its own settings) and uploads again from `__del__` after `close`,
    at interpreter exit, retrying for minutes if the endpoint is gone by then.
    """

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()
        self._dirty = False
        self._lock = threading.Lock()  # tensorboardX writes from its own thread.

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer.write(data)
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._path.write_bytes(self._buffer.getvalue())
                self._dirty = False

    def close(self) -> None:
        self.flush()


class _RemoteEventFileFactory:
    """tensorboardX's writer-factory interface, for `_RemoteEventFile`."""

    def open(self, path: str) -> _RemoteEventFile:
        return _RemoteEventFile(path)

    def directory_check(self, path: str) -> None:
        del path  # Object stores have no directories to create.


def _import_tensorboardx():
    """tensorboardX, imported when a writer first asks for it (protobuf is heavy), without
    torch: tensorboardX imports torch, where it is installed, only to accept torch tensors as
    values, which this module never passes; that import cost each job process ~1.2 s (2 CPU
    cores) wherever torch is installed, e.g. beside the test references. A torch some other
    code imported already is left alone."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX takes.
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


def _register_remote_event_files(workdir: epath.Path) -> None:
    """Routes tensorboardX's event files for `workdir`'s URL scheme through epath."""
    from tensorboardX import record_writer

    scheme = paths.scheme(workdir)
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _RemoteEventFileFactory):
        record_writer.register_writer_factory(scheme, _RemoteEventFileFactory())


def _ends_with_newline(path: epath.Path) -> bool:
    """Whether the (non-empty, local) file at `path` ends with a newline."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(workdir: epath.PathLike, dedupe: bool = False) -> list[dict[str, Any]]:
    """Reads `<workdir>/metrics.jsonl` back (for notebooks and tests).

    Args:
      workdir: The directory given to `MetricWriter`.
      dedupe: Keep only the last record of each step (a resumed run re-logs the steps after
        its checkpoint), ordered by step.

    Returns:
      One dict per line, in file order (or by step with `dedupe`). Torn lines (a writer
      killed mid-write) are skipped with a warning.
    """
    path = epath.Path(workdir) / METRICS_FILE
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("Skipping torn line %d of %s: %r", number, path, line[:80])
    if dedupe:
        records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    return records


def _format_duration(seconds: float) -> str:
    """'0:40', '4:53', '1:02:03'."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_rate(value: float) -> str:
    """'950', '31.2k', '1.25M'."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


def _format_value(value: Any) -> str:
    """Ints as they are, other numbers to 4 significant digits."""
    value = _to_scalar("", value)
    if isinstance(value, int):  # bool included.
        return str(value)
    return f"{value:.4g}"


class Progress:
    """A one-line progress report with throughput and time left.

    Throughput is measured over the last `window` calls to `update`; the time before the first
    call (start-up and compilation of the first step) never counts, so the rate and ETA are
    those of the steady state.
    """

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int | None,
        start_step: int = 0,
        *,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
        log: bool = True,
        label: str = "",
        unit: str = "step",
    ):
        """Starts the clock.

        Args:
          total_steps: The step training ends at.
          tokens_per_step: Tokens processed per step (global batch), for tokens/s; `None`
            reports steps/s instead.
          start_step: The step training (re)starts from. Updates at or before it are not
            timed; the first update after it (which includes compilation) only opens the
            rate window.
          window: How many recent `update` calls the rate is measured over (>= 1).
          clock: Seconds, monotonic; injectable for tests.
          log: Also log each line with absl logging.
          label: Put before each line, e.g. 'influence: covariance'.
          unit: What a step is called on the line, e.g. 'batch'.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self._clock = clock
        self._log = log
        self._prefix = f"{label}: " if label else ""
        self._unit = unit
        self._start_time = clock()
        # (step, time) of recent updates; the oldest is where the rate window begins.
        self._history: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)
        self.start_step = start_step

    def steps_per_second(self) -> float | None:
        """Steady-state steps per second, or `None` before two updates."""
        if len(self._history) < 2:
            return None
        (first_step, first_time), (last_step, last_time) = self._history[0], self._history[-1]
        if last_time <= first_time or last_step <= first_step:
            return None
        return (last_step - first_step) / (last_time - first_time)

    def update(self, step: int, *, log: bool = True, **scalars: Any) -> str:
        """Records that `step` is done and returns (and logs) the progress line.

        Args:
          step: The step just finished.
          log: Log the line (when the instance logs); False only records the time.
          **scalars: Values to show, in order, e.g. `loss=3.214`.

        Returns:
          E.g. 'step 120/1000 (12%) | 31.2k tok/s | loss 3.214 | elapsed 0:40 | ETA 4:53'
          ('--' for the rate and ETA until two updates have been seen).
        """
        now = self._clock()
        if step > self.start_step:  # An update at the start step (a restored state) ran no step.
            if self._history and step <= self._history[-1][0]:
                self._history.clear()  # Stepped back (restored an older state): new window.
            self._history.append((step, now))
        percent = math.floor(100 * step / self.total_steps) if self.total_steps else 100
        parts = [f"{self._prefix}{self._unit} {step}/{self.total_steps} ({percent}%)"]
        rate = self.steps_per_second()
        if self.tokens_per_step is None:
            unit = f"{self._unit}s/s"
            parts.append(f"{rate:.3g} {unit}" if rate else f"-- {unit}")
        else:
            tokens = None if rate is None else rate * self.tokens_per_step
            parts.append(f"{_format_rate(tokens)} tok/s" if tokens else "-- tok/s")
        parts += [f"{name} {_format_value(value)}" for name, value in scalars.items()]
        parts.append(f"elapsed {_format_duration(now - self._start_time)}")
        remaining = max(self.total_steps - step, 0)
        parts.append(f"ETA {_format_duration(remaining / rate)}" if rate else "ETA --")
        line = " | ".join(parts)
        if self._log and log:
            logging.info(line)
        return line


class Tracked:
    """A sized iterable that logs a progress line (`Progress`) as it is iterated: for the
    batches of a pass a library function consumes (influence factor fits and searches,
    feature statistics), so a long pass shows its rate and ETA. Re-iterable: each pass
    starts a new line count ('label, pass 2' from the second).

        batches = metrics.Tracked(batches, "influence: factors", tokens_per_item=8 * 128)
        fit_factors(model, params, batches, ...)

    A line is logged when the next item is asked for once `seconds` have passed since the
    last line, and at the end of each pass; so the time of an item's work is counted where
    the consumer works item by item. (A consumer that only queues work asynchronously, as
    JAX dispatch does, makes the rate that of queueing.)
    """

    def __init__(
        self,
        items,
        label: str,
        tokens_per_item: int | None = None,
        *,
        seconds: float = 10.0,
        unit: str = "batch",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.items = list(items)
        self.label = label
        self.tokens_per_item = tokens_per_item
        self.seconds = seconds
        self.unit = unit
        self._clock = clock
        self._passes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        self._passes += 1
        label = self.label if self._passes == 1 else f"{self.label}, pass {self._passes}"
        progress = Progress(len(self.items), self.tokens_per_item, label=label, unit=self.unit,
                            clock=self._clock)  # fmt: skip
        last = self._clock()
        for index, item in enumerate(self.items):
            if index == 1:
                progress.update(index, log=False)  # Opens the rate window after the first.
            elif index and self._clock() - last >= self.seconds:
                progress.update(index)
                last = self._clock()
            yield item
        if self.items:
            progress.update(len(self.items))
