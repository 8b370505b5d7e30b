r"""Cloud TPU launch: the gcloud commands that create a TPU VM or pod slice, put this checkout
on every worker, install it, run an experiment main on all workers, and delete the slice.

    run = launch.TpuRun(name="sae-sweep", zone="us-west4-a", slice="v5litepod-16",
                        main="train_sae", config="configs/gemma2_2b_sae.py:slice=v5litepod-16",
                        workdir="gs://my-bucket/runs/sae-sweep", spot=True)
    print(launch.format_steps(launch.steps(run, "all")))   # what a dry run prints
    launch.execute(launch.steps(run, "all"))                # runs them, in order

`experiments/launch_tpu.py` is the command-line front end (`--dry_run` prints the commands).
Every worker runs the same command, `python -m experiments.<main> --config=... --workdir=gs://...
--distributed`, which joins the cluster JAX detects on the slice; the workdir must be gs://
(the workers share no disk, and a spot VM's disk is gone after a preemption). Re-running the
same launch after a preemption resumes from the workdir's last checkpoint.

The gcloud syntax, checked against Google's pages (2026-12):
  * create: `gcloud compute tpus tpu-vm create NAME --zone=Z --accelerator-type=T --version=V`
    (https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create); for spot
    capacity a queued resource, `gcloud compute tpus queued-resources create NAME --zone=Z
    --node-id=NAME --accelerator-type=T --runtime-version=V --spot`, ready when its state is
    ACTIVE (https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create,
    https://cloud.google.com/tpu/docs/queued-resources);
  * every worker: `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command=...` and
    `gcloud compute tpus tpu-vm scp LOCAL NAME:REMOTE --zone=Z --worker=all`
    (https://cloud.google.com/tpu/docs/jax-pods);
  * delete: `gcloud compute tpus tpu-vm delete NAME --zone=Z --quiet`, or for a queued resource
    `gcloud compute tpus queued-resources delete NAME --zone=Z --force --quiet` (--force also
    deletes its node).
Runtime versions per TPU generation: `interp.parallel.slices`.

Python on the workers: the TPU runtimes are Ubuntu 22.04 images with Python 3.10, and JAX
0.10 needs Python >= 3.11, so setup installs `uv` with the system pip and makes a Python 3.11
virtual environment (`uv venv --python 3.11`, which downloads a standalone Python) holding
`-e .` and `jax[tpu]` under requirements/constraints.txt (the JAX version the tests pin;
`jax[tpu]` then picks the matching libtpu).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from interp.parallel.slices import get_slice

ACTIONS = ("all", "create", "setup", "run", "logs", "status", "delete")
PLACEHOLDER = "YOUR_BUCKET"  # In the real-run configs' paths, until a user sets their own.
VENV = "interp-venv"  # On each worker, in the home directory.
LOG = "interp-run.log"  # A detached run's output, on each worker.
# Queued-resource states after which waiting for ACTIVE is pointless.
_DEAD_STATES = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")


@dataclasses.dataclass(frozen=True)
class TpuRun:
    """One experiment run on a Cloud TPU slice.

    Attributes:
      name: The TPU VM's name (and the queued resource's, for spot): lower-case letters,
        digits and hyphens, starting with a letter.
      zone: The zone, e.g. 'us-west4-a' (one that offers the slice's TPU generation).
      slice: A TPU preset of `interp.parallel.SLICES` ('v4-32', 'v5litepod-16', ...).
      main: The experiment main, a module of experiments/ ('train_sae', 'influence', ...).
      config: The --config argument as given ('configs/gemma2_2b_sae.py:slice=v5litepod-16').
      workdir: gs:// folder the run writes (and resumes from).
      overrides: More arguments for the main, verbatim ('--config.sae.k=64').
      project: Google Cloud project; '' = gcloud's configured default.
      spot: Spot capacity through a queued resource (cheaper, preemptible).
      repo: '' ships this checkout (`git archive` of `ref`, committed files only) with scp;
        else a git URL each worker clones.
      ref: The commit (or branch, tag) shipped or checked out.
      detach: Run in the background on each worker (output in ~/interp-run.log, see the 'logs'
        action), so the launch returns and a dropped ssh session does not stop the run.
      python: Python version of the workers' virtual environment.
    """

    name: str
    zone: str
    slice: str
    main: str
    config: str
    workdir: str
    overrides: tuple[str, ...] = ()
    project: str = ""
    spot: bool = False
    repo: str = ""
    ref: str = "HEAD"
    detach: bool = False
    python: str = "3.11"

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise ValueError(
                f"TPU name {self.name!r} must be lower-case letters, digits and hyphens, start "
                "with a letter, end with a letter or digit, and be at most 63 characters."
            )
        if not self.zone:
            raise ValueError("Give the zone (e.g. --zone=us-west4-a); TPUs are zonal.")
        if get_slice(self.slice).platform != "tpu":
            raise ValueError(
                f"{self.slice!r} is a GPU node, not a TPU slice; on a GPU machine run the "
                "experiment main directly (docs/tpu.md)."
            )
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", self.main):
            raise ValueError(f"main {self.main!r} must name a module of experiments/.")
        if not self.workdir.startswith("gs://"):
            raise ValueError(
                f"workdir {self.workdir!r} is not gs://: the workers share no disk and a spot "
                "VM's disk does not survive a preemption; give gs://BUCKET/PATH."
            )
        if not self.config:
            raise ValueError("Give the experiment config (--config=configs/FILE.py[:ARGS]).")
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a launch.

    Attributes:
      what: One line saying what it does.
      argv: The command (run without a shell; remote commands are one --command argument).
      until: '' runs it once; else it is re-run until its output is this (a state to wait for).
    """

    what: str
    argv: tuple[str, ...]
    until: str = ""


def _where(run: TpuRun) -> list[str]:
    return [f"--zone={run.zone}"] + ([f"--project={run.project}"] if run.project else [])


def _tpu_vm(run: TpuRun, verb: str, *args: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args, *_where(run))


def _queued(run: TpuRun, verb: str, *args: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", "queued-resources", verb, run.name, *_where(run), *args)


def _on_all_workers(run: TpuRun, what: str, command: str) -> Step:
    return Step(what, _tpu_vm(run, "ssh", run.name, "--worker=all", f"--command={command}"))


def archive_path(run: TpuRun) -> str:
    """Where the local `git archive` of the checkout is written before it is copied."""
    return f"/tmp/{run.name}-interp.tar.gz"


def experiment_command(run: TpuRun) -> str:
    """The shell command each worker runs, from its home directory."""
    argv = [
        f"../{VENV}/bin/python", "-m", f"experiments.{run.main}", f"--config={run.config}",
        f"--workdir={run.workdir}", "--distributed", *run.overrides,
    ]  # fmt: skip
    if run.detach:
        # setsid + nohup: the run outlives the ssh session; its output goes to ~/interp-run.log.
        return f"cd interp && nohup setsid {shlex.join(argv)} > ../{LOG} 2>&1 < /dev/null &"
    return f"cd interp && {shlex.join(argv)}"


def _create(run: TpuRun) -> list[Step]:
    tpu = get_slice(run.slice)
    if run.spot:
        return [
            Step(
                f"Queue a spot {run.slice} ({tpu.devices} chips, {tpu.hosts} workers)",
                _queued(
                    run,
                    "create",
                    f"--node-id={run.name}",
                    f"--accelerator-type={tpu.accelerator_type}",
                    f"--runtime-version={tpu.runtime_version}",
                    "--spot",
                ),
            ),  # fmt: skip
            Step(
                "Wait until the queued resource is ACTIVE",
                _queued(run, "describe", "--format=value(state.state)"),
                until="ACTIVE",
            ),
        ]
    return [
        Step(
            f"Create a {run.slice} TPU VM ({tpu.devices} chips, {tpu.hosts} workers)",
            _tpu_vm(
                run,
                "create",
                run.name,
                f"--accelerator-type={tpu.accelerator_type}",
                f"--version={tpu.runtime_version}",
            ),
        )  # fmt: skip
    ]


def _setup(run: TpuRun) -> list[Step]:
    if run.repo:
        fetch = [
            _on_all_workers(
                run,
                f"Clone {run.repo} at {run.ref} on every worker",
                f"rm -rf interp && git clone {shlex.quote(run.repo)} interp && "
                f"git -C interp checkout {shlex.quote(run.ref)}",
            )
        ]
    else:
        archive = archive_path(run)
        fetch = [
            Step(
                f"Pack the checkout's committed files at {run.ref}",
                ("git", "archive", "--format=tar.gz", f"--output={archive}", run.ref),
            ),
            Step(
                "Copy them to every worker",
                _tpu_vm(run, "scp", archive, f"{run.name}:interp.tar.gz", "--worker=all"),
            ),
            _on_all_workers(
                run,
                "Unpack them on every worker",
                "rm -rf interp && mkdir interp && tar -xzf interp.tar.gz -C interp",
            ),
        ]
    install = (
        "set -e; python3 -m pip install --user --quiet uv; "
        f"~/.local/bin/uv venv --clear --python {shlex.quote(run.python)} {VENV}; "
        f"~/.local/bin/uv pip install --python {VENV}/bin/python "
        "-c interp/requirements/constraints.txt -e ./interp 'jax[tpu]'"
    )
    return fetch + [
        _on_all_workers(run, f"Install interp and jax[tpu] in ~/{VENV} on every worker", install)
    ]


def steps(run: TpuRun, action: str = "all") -> list[Step]:
    """The commands of `action` for `run`, in order.

    Args:
      run: What to launch where.
      action: 'all' (create, setup, run), 'create', 'setup' (copy and install the code),
        'run' (the experiment on all workers), 'logs' (the last lines of a detached run's
        output on worker 0), 'status' (describe the TPU) or 'delete'.

    Raises:
      ValueError: for an unknown action.
    """
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}; actions: {ACTIONS}.")
    run_step = _on_all_workers(
        run, f"Run experiments.{run.main} on every worker", experiment_command(run)
    )
    if action == "all":
        return _create(run) + _setup(run) + [run_step]
    if action == "create":
        return _create(run)
    if action == "setup":
        return _setup(run)
    if action == "run":
        return [run_step]
    if action == "logs":
        return [
            Step(
                "The last lines of worker 0's output",
                _tpu_vm(run, "ssh", run.name, "--worker=0", f"--command=tail -n 100 {LOG}"),
            )
        ]
    if action == "status":
        if run.spot:
            return [Step("Describe the queued resource", _queued(run, "describe"))]
        return [Step("Describe the TPU VM", _tpu_vm(run, "describe", run.name))]
    if run.spot:
        return [Step("Delete the queued resource and its TPU VM",
                     _queued(run, "delete", "--force", "--quiet"))]  # fmt: skip
    return [Step("Delete the TPU VM", _tpu_vm(run, "delete", run.name, "--quiet"))]


def format_steps(step_list: Iterable[Step]) -> str:
    """The commands as a shell script would hold them: '# what' then the quoted command."""
    lines = []
    for step in step_list:
        wait = f" (repeated until it prints {step.until})" if step.until else ""
        lines += [f"# {step.what}{wait}", shlex.join(step.argv)]
    return "\n".join(lines)


def execute(
    step_list: Sequence[Step],
    *,
    poll_seconds: float = 30.0,
    timeout_seconds: float = 24 * 3600.0,
    echo: Callable[[str], Any] = print,
    sleep: Callable[[float], Any] = time.sleep,
) -> None:
    """Runs the steps in order; stops at the first that fails.

    Waiting steps (`until`) are re-run every `poll_seconds` until their output is `until`.

    Raises:
      subprocess.CalledProcessError: a command exited non-zero (the step is echoed before).
      RuntimeError: a queued resource reached a state it never leaves for ACTIVE (FAILED,
        SUSPENDED, ...), or waiting took longer than `timeout_seconds`.
    """
    for step in step_list:
        echo(format_steps([step]))
        if not step.until:
            subprocess.run(step.argv, check=True)
            continue
        waited = 0.0
        while True:
            state = subprocess.run(step.argv, check=True, capture_output=True, text=True)
            state = state.stdout.strip()
            if state == step.until:
                break
            if state in _DEAD_STATES:
                raise RuntimeError(
                    f"{step.what}: the state is {state}, which never becomes {step.until}; "
                    "delete it (action 'delete') and launch again."
                )
            if waited >= timeout_seconds:
                raise RuntimeError(f"{step.what}: still {state or 'unknown'} after "
                                   f"{waited:.0f} s.")  # fmt: skip
            echo(f"  state {state or '(none yet)'}; checking again in {poll_seconds:.0f} s")
            sleep(poll_seconds)
            waited += poll_seconds


def config_for_workers(config: str, root: str | os.PathLike) -> str:
    """The --config argument as the workers must get it: its file relative to the checkout.

    The workers run from their copy of the checkout, so a config given by an absolute path
    (or as ../interp/configs/x.py) must reach them as configs/x.py.

    Args:
      config: The --config argument, 'FILE[:ARGS]', FILE relative to the current directory
        or absolute.
      root: The checkout's root folder.

    Returns:
      'configs/x.py[:ARGS]': the file relative to `root`, then the arguments unchanged.

    Raises:
      ValueError: The file is not inside `root`: the workers would not have it.
    """
    file, colon, args = config.partition(":")
    root = pathlib.Path(root).resolve()
    try:
        relative = pathlib.Path(file).resolve().relative_to(root)
    except ValueError:
        raise ValueError(
            f"The config {file} is outside the checkout {root}, and the workers get only the "
            "checkout's files: put it under configs/ and commit it."
        ) from None
    return relative.as_posix() + colon + args


def uncommitted(config: str, root: str | os.PathLike, ref: str = "HEAD") -> str:
    """Why the workers would not run the config file checked here ('' when they would).

    The launch ships `git archive REF` (committed files only), while the config is loaded
    here from the working tree: an uncommitted or changed config would be checked here and
    another (or none) run on the pod.

    Args:
      config: From `config_for_workers` ('configs/x.py[:ARGS]').
      root: The checkout's root folder (a git work tree).
      ref: The commit shipped.
    """
    file = config.partition(":")[0]
    shipped = subprocess.run(
        ["git", "-C", os.fspath(root), "show", f"{ref}:{file}"], capture_output=True, check=False
    )
    if shipped.returncode != 0:
        return f"{file} is not committed at {ref}, which is what the workers get: commit it"
    if shipped.stdout != (pathlib.Path(root) / file).read_bytes():
        return (
            f"{file} differs from its version committed at {ref}, which the workers would "
            "run instead of the one checked here: commit it"
        )
    return ""


def placeholders(values: Mapping[str, Any], prefix: str = "config") -> list[str]:
    """Dotted names of the string fields (nested) that still hold `PLACEHOLDER`.

    For a real-run config's `to_dict()`: `--config.sae.model_path=gs://my-bucket/...` fixes one.
    """
    found = []
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            found += placeholders(value, name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    found += placeholders(item, f"{name}[{i}]")
                elif isinstance(item, str) and PLACEHOLDER in item:
                    found.append(f"{name}[{i}]")
        elif isinstance(value, str) and PLACEHOLDER in value:
            found.append(name)
    return found
