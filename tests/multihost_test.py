"""Experiment mains as a real multi-process `jax.distributed` job: 2 CPU processes x 4 devices
(gloo collectives) against one process with 8 devices, and a join that cannot succeed."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from interp import safetensors_io
from interp.jobs import loop
from tests import multiprocess, runs

CONFIG = os.path.join(runs.ROOT, "configs", "demo.py") + ":tiny=True"
STEPS = 6  # The tiny config's SAE steps; checkpoints every 3.


def _sae_flags(model_path, workdir, steps, data=4, fsdp=1, model=2):
    """The tiny demo's SAE stage, one TopK SAE of 64 latents, on a (data, fsdp, model) mesh of
    the 8 devices (the last axis varies fastest: processes split the first axis over 1).
    data=4 x model=2 splits batches over both processes; data=1 x fsdp=2 x model=4 splits
    batches and the SAE's input width ('embed') over them, latents within each."""
    return [
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.sae.model_path={model_path}",
        f"--config.mesh.data={data}",
        f"--config.mesh.fsdp={fsdp}",
        f"--config.mesh.model={model}",
        "--config.sae.saes=({'architecture': 'topk', 'k': 4},)",
        f"--config.sae.train.steps={steps}",
        # The schedule of the full run from the start, so stopping at step 3 and going on
        # walks the same learning rates (steps may change on resume, the schedule may not).
        f"--config.sae.train.schedule_steps={STEPS}",
    ]


# Runs `python -m <argv[1]> <argv[2:]>` and records every file it opens for writing, or
# renames into place, under WRITES_UNDER, one path a line in WRITES_LOG (Python's audit hooks:
# what Python code writes, which is every non-array file; tensorstore's C++ writes are not
# seen, and are allowed from every process anyway).
_AUDITED_MAIN = textwrap.dedent(
    """
    import os, runpy, sys

    _log = open(os.environ["WRITES_LOG"], "w", buffering=1)
    _under = os.environ["WRITES_UNDER"]
    _WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITING)
        elif event in ("os.rename", "os.replace"):
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, (str, os.PathLike)):
            path = os.fspath(path)
            if isinstance(path, str) and path.startswith(_under):
                _log.write(os.path.relpath(path, _under) + "\\n")

    sys.addaudithook(_audit)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


def _two_processes(flags, workdir, log_dir, name, by_environment=False):
    """Runs experiments.train_sae as processes 0 and 1 of one job, told so by flags or by
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; each one's output and the
    files it wrote (relative to the workdir)."""
    address = f"127.0.0.1:{multiprocess.free_port()}"
    envs, argvs = [], []
    for i in range(2):
        env = dict(WRITES_LOG=str(log_dir / f"{name}_writes_{i}.txt"), WRITES_UNDER=str(workdir))
        job = [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
        if by_environment:
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(i))  # fmt: skip
            job = []
        envs.append(env)
        argvs.append(["experiments.train_sae", *flags, *job])
    outputs = multiprocess.start_workers(_AUDITED_MAIN, argvs, envs, timeout=240).wait()
    writes = [set((log_dir / f"{name}_writes_{i}.txt").read_text().split()) for i in range(2)]
    return outputs, writes


def _is_array_file(path: str) -> bool:
    """Checkpoint shards and metadata: every process writes its own (orbax coordinates)."""
    return path.split(os.sep)[0] == loop.CHECKPOINT_DIR


def _sae_arrays(workdir):
    """{SAE name: {tensor name: array}} of the SAE folders a run exported."""
    root = workdir / "saes"
    return {
        folder.name: safetensors_io.read(next(folder.glob("*.safetensors")))
        for folder in sorted(root.iterdir())
    }


def test_sae_main_in_two_processes_matches_one(tiny_pipeline, tmp_path):
    model_path = os.path.join(tiny_pipeline[0], "lm", "export")
    reference, multi = tmp_path / "reference", tmp_path / "multi"

    # Two processes: to step 3 (a checkpoint), data-parallel over them; then a second job
    # restores it into weights split over both processes (a layout no process holds whole:
    # exporting needs the gather) and goes on to step 6.
    first, first_writes = _two_processes(_sae_flags(model_path, multi, 3), multi, tmp_path, "a")
    second, second_writes = _two_processes(
        _sae_flags(model_path, multi, STEPS, data=1, fsdp=2, model=4), multi, tmp_path, "b",
        by_environment=True,
    )  # fmt: skip
    for output in first + second:
        assert "Process " in output and " of 2, 4 local / 8 global devices." in output
    assert all("Resumed SAE training from step 3 of 6" in output for output in second), second[0]

    # One process with all 8 devices, uninterrupted.
    runs.run_main("experiments.train_sae", CONFIG, str(reference),
                  *_sae_flags(model_path, reference, STEPS)[2:], timeout=300)  # fmt: skip

    # Same weights. Tolerance: the maths and the batches are the same; what differs is how
    # the data-parallel sums over the 4 `data` shards are reduced (gloo across processes vs
    # XLA within one): float32 rounding, one ulp or so (seen: 8e-8 of the largest weight
    # after 6 steps), so 1e-6 of each tensor's scale; a wrong batch, a lost or repeated step
    # or a bad restore moves weights by ~lr = 1e-3.
    got, want = _sae_arrays(multi), _sae_arrays(reference)
    assert list(got) == list(want) and len(want) == 1, (list(got), list(want))
    for name, tensors in want.items():
        assert set(got[name]) == set(tensors)
        for key, value in tensors.items():
            scale = max(np.abs(value).max(), 1e-6)
            np.testing.assert_allclose(
                got[name][key], value, rtol=0, atol=1e-6 * scale, err_msg=f"{name} {key}"
            )
    # Same evaluation (every process evaluates the gathered SAE on the same held-out rows);
    # float64 sums of those float32 forward passes (seen: 9e-7 relative, in the KL).
    got_eval = json.loads((multi / "eval.json").read_text())
    want_eval = json.loads((reference / "eval.json").read_text())
    assert got_eval.keys() == want_eval.keys()
    for name, figures in want_eval.items():
        assert got_eval[name].keys() == figures.keys()
        for key, value in figures.items():
            np.testing.assert_allclose(got_eval[name][key], value, rtol=1e-5, atol=1e-9,
                                       err_msg=f"{name} {key}")  # fmt: skip

    # Exactly one writer of the non-array files: process 0 wrote each of them, in both jobs;
    # process 1 wrote nothing but its checkpoint shards.
    (sae_name,) = want
    expected = {
        "config.json",
        "metrics.jsonl",
        "eval.json",
        os.path.join("saes", sae_name, "cfg.json"),
    }
    for writes in (first_writes, second_writes):
        process_0, process_1 = writes
        assert expected <= process_0, sorted(process_0)
        assert any(path.startswith("tb" + os.sep) for path in process_0), sorted(process_0)
        assert any(path.endswith(".safetensors") for path in process_0), sorted(process_0)
        assert not {p for p in process_1 if not _is_array_file(p)}, sorted(process_1)
    # Both processes took part in the checkpoints (every process writes its shards).
    assert any(_is_array_file(p) for p in first_writes[1]), sorted(first_writes[1])


def test_failed_join_is_a_clear_error(tmp_path):
    # Asked to join: a coordinator nobody serves, process 0 waiting for a process that never
    # comes, and --distributed with no cluster to detect. Each must end quickly, non-zero,
    # saying why and what to do, before writing anything.
    port = multiprocess.free_port()
    cases = {
        "absent coordinator": (
            [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1"],
            f"nothing accepts connections at 127.0.0.1:{port}",
        ),
        "missing process": (
            [
                f"--coordinator_address=127.0.0.1:{multiprocess.free_port()}",
                "--num_processes=2",
                "--process_id=0",
            ],
            "not all 2 processes joined",
        ),  # fmt: skip
        "no cluster": (["--distributed"], "JAX detected no cluster"),
    }
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR_"))
    }
    started = time.monotonic()
    processes = {
        case: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train_sae",
                f"--config={CONFIG}",
                f"--workdir={tmp_path / case.replace(' ', '_')}",
                "--distributed_timeout=3",
                *flags,
            ],
            cwd=runs.ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for case, (flags, _) in cases.items()
    }
    for case, process in processes.items():
        output = process.communicate(timeout=120)[0]
        assert process.returncode != 0, f"{case}:\n{output[-3000:]}"
        assert cases[case][1] in output, f"{case}:\n{output[-3000:]}"
        assert "--coordinator_address" in output and "--num_processes" in output, output[-3000:]
        assert not (tmp_path / case.replace(" ", "_")).exists(), case  # Nothing written.
    # The 3 s timeout, not JAX's own 5 minutes (and not its C++ abort 30 s later).
    assert time.monotonic() - started < 60


def test_a_failing_main_exits_non_zero_in_every_process(tmp_path):
    # Both processes join, then the SAE job fails (no model at model_path): each must end
    # non-zero with its traceback, promptly, not hang in teardown or exit 0.
    port = multiprocess.free_port()
    flags = _sae_flags(tmp_path / "no_model", tmp_path / "run", STEPS)
    processes = [
        subprocess.Popen(
            [
                "timeout",
                "-k",
                "5",
                "120",
                sys.executable,
                "-m",
                "experiments.train_sae",
                *flags,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=runs.ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, XLA_FLAGS=multiprocess.xla_flags(4)),
        )  # fmt: skip
        for i in range(2)
    ]
    for i, process in enumerate(processes):
        output = process.communicate(timeout=150)[0]
        assert process.returncode == 1, f"process {i} ({process.returncode}):\n{output[-3000:]}"
        assert f"Process {i} of 2" in output, output[-3000:]
        assert "This process of the multi-process job failed." in output, output[-3000:]
        assert "no_model" in output and "Traceback" in output, output[-3000:]
