"""The Cloud TPU launch commands, dry-run: the exact gcloud lines for a config and a slice (no
cloud account here), the launcher main's printout, and `execute` against a stand-in gcloud."""

import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

from interp import launch
from tests.runs import ROOT

SPOT = launch.TpuRun(
    name="gemma-sae",
    zone="us-west4-a",
    slice="v5litepod-16",
    main="train_sae",
    config="configs/gemma2_2b_sae.py:slice=v5litepod-16",
    workdir="gs://my-bucket/runs/gemma-sae",
    overrides=("--config.sae.model_path=gs://my-bucket/models/gemma-2-2b",),
    project="my-project",
    spot=True,
)
WHERE = "--zone=us-west4-a --project=my-project"
RUN = (
    "cd interp && ../interp-venv/bin/python -m experiments.train_sae "
    "--config=configs/gemma2_2b_sae.py:slice=v5litepod-16 --workdir=gs://my-bucket/runs/gemma-sae "
    "--distributed --config.sae.model_path=gs://my-bucket/models/gemma-2-2b"
)
INSTALL = (
    "set -e; python3 -m pip install --user --quiet uv; "
    "~/.local/bin/uv venv --clear --python 3.11 interp-venv; "
    "~/.local/bin/uv pip install --python interp-venv/bin/python "
    "-c interp/requirements/constraints.txt -e ./interp 'jax[tpu]'"
)
SSH = "gcloud compute tpus tpu-vm ssh gemma-sae --worker=all"


def _lines(steps):
    return [shlex.join(step.argv) for step in steps]


def test_spot_launch_commands():
    assert _lines(launch.steps(SPOT, "all")) == [
        "gcloud compute tpus queued-resources create gemma-sae --zone=us-west4-a "
        "--project=my-project --node-id=gemma-sae --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --spot",
        "gcloud compute tpus queued-resources describe gemma-sae --zone=us-west4-a "
        "--project=my-project '--format=value(state.state)'",
        "git archive --format=tar.gz --output=/tmp/gemma-sae-interp.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/gemma-sae-interp.tar.gz gemma-sae:interp.tar.gz "
        f"--worker=all {WHERE}",
        f"{SSH} '--command=rm -rf interp && mkdir interp && tar -xzf interp.tar.gz -C interp' "
        f"{WHERE}",
        f"{SSH} {shlex.quote('--command=' + INSTALL)} {WHERE}",
        f"{SSH} {shlex.quote('--command=' + RUN)} {WHERE}",
    ]
    assert launch.steps(SPOT, "create")[1].until == "ACTIVE"
    assert _lines(launch.steps(SPOT, "delete")) == [
        f"gcloud compute tpus queued-resources delete gemma-sae {WHERE} --force --quiet"
    ]


def test_on_demand_git_clone_and_detached_run():
    run = launch.TpuRun(
        name="pythia-influence", zone="us-central2-b", slice="v4-8", main="influence",
        config="configs/pythia_influence.py", workdir="gs://b/run",
        repo="https://github.com/me/interp.git", ref="v1.0", detach=True,
    )  # fmt: skip
    ssh = "gcloud compute tpus tpu-vm ssh pythia-influence --worker=all"
    assert _lines(launch.steps(run)) == [
        "gcloud compute tpus tpu-vm create pythia-influence --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base --zone=us-central2-b",
        f"{ssh} '--command=rm -rf interp && git clone https://github.com/me/interp.git interp "
        "&& git -C interp checkout v1.0' --zone=us-central2-b",
        f"{ssh} {shlex.quote('--command=' + INSTALL)} --zone=us-central2-b",
        f"{ssh} '--command=cd interp && nohup setsid ../interp-venv/bin/python -m "
        "experiments.influence --config=configs/pythia_influence.py --workdir=gs://b/run "
        "--distributed > ../interp-run.log 2>&1 < /dev/null &' --zone=us-central2-b",
    ]
    assert _lines(launch.steps(run, "delete")) == [
        "gcloud compute tpus tpu-vm delete pythia-influence --quiet --zone=us-central2-b"
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(workdir="/tmp/run"), "is not gs://"),
        (dict(slice="h100-8"), "is a GPU node"),
        (dict(slice="v9-8"), "Unknown slice 'v9-8'"),
        (dict(name="Gemma_SAE"), "lower-case letters"),
    ],
)
def test_bad_runs_are_refused(change, message):
    fields = {f: getattr(SPOT, f) for f in ("name", "zone", "slice", "main", "config", "workdir")}
    with pytest.raises(ValueError, match=message):
        launch.TpuRun(**(fields | change))


def test_placeholders_are_found():
    found = launch.placeholders(
        {"sae": {"model_path": "gs://YOUR_BUCKET/m", "sites": ["a"]}, "data": {"text_path": "x"},
         "influence": {"queries": [{"prompt": "gs://YOUR_BUCKET/q"}]}}
    )  # fmt: skip
    assert found == ["config.sae.model_path", "config.influence.queries[0].prompt"]


def test_launcher_main_dry_run_prints_the_commands():
    args = [
        "--name=gemma-sae", "--zone=us-west4-a", "--project=my-project", "--slice=v5litepod-16",
        "--main=train_sae", "--config=configs/gemma2_2b_sae.py:slice=v5litepod-16",
        "--config.sae.model_path=gs://my-bucket/models/gemma-2-2b",
        "--workdir=gs://my-bucket/runs/gemma-sae", "--spot", "--dry_run",
    ]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "experiments.launch_tpu", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    header = [
        "# v5litepod-16: 16 devices on 4 workers, mesh {'data': 1, 'fsdp': 1, 'model': 16}",
        "# config.data.text_path still holds YOUR_BUCKET: set --config.data.text_path=gs://...",
        "# config.sae.cache_path still holds YOUR_BUCKET: set --config.sae.cache_path=gs://...",
    ]
    assert (
        out.stdout.splitlines()
        == header + launch.format_steps(launch.steps(SPOT, "all")).splitlines()
    )
    # A mesh that does not fit the slice fails here, before anything is created.
    bad = [a.replace("--slice=v5litepod-16", "--slice=v4-8") for a in args]
    out = subprocess.run([sys.executable, "-m", "experiments.launch_tpu", *bad], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode != 0
    assert "The config's mesh does not fit v4-8" in out.stderr
    assert "device count 4 to be divisible by fsdp=1 * model=16" in out.stderr


def _fake_gcloud(tmp_path: pathlib.Path, states: list[str]) -> dict[str, str]:
    """A stand-in `gcloud` on PATH: logs its arguments, prints queued-resource states in turn."""
    log, script = tmp_path / "calls.log", tmp_path / "bin" / "gcloud"
    script.parent.mkdir()
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *describe*)\n'
        f"  head -n 1 {tmp_path}/states; sed -i 1d {tmp_path}/states;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}


def test_execute_waits_for_active_then_runs(tmp_path, monkeypatch):
    for key, value in _fake_gcloud(tmp_path, ["WAITING_FOR_RESOURCES", "ACTIVE"]).items():
        monkeypatch.setenv(key, value)
    slept = []
    launch.execute(launch.steps(SPOT, "create") + launch.steps(SPOT, "run"),
                   echo=lambda _: None, sleep=slept.append, poll_seconds=5)  # fmt: skip
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["create", "describe", "describe", "ssh"]
    assert slept == [5]


def test_execute_stops_on_a_failed_queued_resource(tmp_path, monkeypatch):
    for key, value in _fake_gcloud(tmp_path, ["PROVISIONING", "FAILED"]).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="the state is FAILED"):
        launch.execute(launch.steps(SPOT, "all"), echo=lambda _: None, sleep=lambda _: None)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["create", "describe", "describe"]


def test_the_config_reaches_the_workers_relative_to_the_checkout(tmp_path):
    # The workers run from their copy of the checkout: an absolute path is made relative, a
    # config outside the checkout is refused (they would not have it).
    absolute = pathlib.Path(ROOT, "configs", "gemma2_2b_sae.py")
    assert launch.config_for_workers(f"{absolute}:slice=v4-8", ROOT) == (
        "configs/gemma2_2b_sae.py:slice=v4-8"
    )
    assert launch.config_for_workers("configs/demo.py", ROOT) == "configs/demo.py"
    outside = tmp_path / "mine.py"
    with pytest.raises(ValueError, match="outside the checkout"):
        launch.config_for_workers(f"{outside}:tiny=True", ROOT)


def test_an_uncommitted_config_is_named(tmp_path):
    # The launch ships `git archive REF`; a config checked here but not committed there
    # would not be what the workers run.
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.py").write_text("A = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    assert launch.uncommitted("configs/a.py:x=1", tmp_path) == ""
    (tmp_path / "configs" / "a.py").write_text("A = 2\n")
    assert "configs/a.py differs from its version committed at HEAD" in launch.uncommitted(
        "configs/a.py", tmp_path
    )
    (tmp_path / "configs" / "b.py").write_text("B = 1\n")
    assert "configs/b.py is not committed at HEAD" in launch.uncommitted("configs/b.py", tmp_path)


def test_launcher_main_forwards_an_absolute_config_path_relative():
    args = [
        "--name=gemma-sae", "--zone=us-west4-a", "--slice=v5litepod-16", "--main=train_sae",
        f"--config={pathlib.Path(ROOT, 'configs', 'gemma2_2b_sae.py')}:slice=v5litepod-16",
        "--workdir=gs://my-bucket/runs/gemma-sae", "--dry_run", "--action=run",
    ]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "experiments.launch_tpu", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert " --config=configs/gemma2_2b_sae.py:slice=v5litepod-16 " in out.stdout
