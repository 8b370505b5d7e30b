r"""Launches an experiment main on a Cloud TPU VM or pod slice (gcloud), or prints the commands.

    python -m experiments.launch_tpu --name=sae-sweep --zone=us-west4-a --slice=v5litepod-16 \
        --main=train_sae --config=configs/gemma2_2b_sae.py:slice=v5litepod-16 \
        --config.sae.model_path=gs://my-bucket/models/gemma-2-2b \
        --workdir=gs://my-bucket/runs/sae-sweep --spot --dry_run

Without --dry_run it runs the commands: create the slice (a queued resource with --spot),
copy this checkout's committed files to every worker, install them with jax[tpu], and run
`python -m experiments.<main> --config=... --workdir=gs://... --distributed` on all workers.
`--action=delete` deletes the slice; `--action=run` re-runs the experiment (it resumes from the
workdir's last checkpoint), `--action=setup` re-copies the code. The config is loaded here first,
so a typo in an override, a mesh that does not fit the slice, a path still holding
YOUR_BUCKET, or a config file that the shipped commit does not hold as it is here fails before
anything is created (the dry run names them). Guide: docs/tpu.md.
"""

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from interp import launch, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "gs:// folder the run writes and resumes from.")
_NAME = flags.DEFINE_string("name", None, "TPU VM (and queued resource) name.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-west4-a (v5e) or us-central2-b (v4).")
_PROJECT = flags.DEFINE_string("project", "", "Google Cloud project; '' = gcloud's default.")
_SLICE = flags.DEFINE_enum(
    "slice", None, [n for n, s in parallel.SLICES.items() if s.platform == "tpu"], "TPU slice."
)
_MAIN = flags.DEFINE_string("main", None, "Experiment main: a module of experiments/.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity through a queued resource.")
_REPO = flags.DEFINE_string("repo", "", "Git URL the workers clone; '' = copy this checkout.")
_REF = flags.DEFINE_string("ref", "HEAD", "Commit, branch or tag shipped or checked out.")
_DETACH = flags.DEFINE_bool("detach", False, "Run in the background (see --action=logs).")
_ACTION = flags.DEFINE_enum("action", "all", launch.ACTIONS, "What to do.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
for _flag in ("config", "workdir", "name", "zone", "slice", "main"):
    flags.mark_flag_as_required(_flag)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def config_overrides(argv: list[str]) -> tuple[str, ...]:
    """The `--config.x=y` arguments of the command line, verbatim, for the workers' main.

    Raises:
      app.UsageError: for `--config.x y` (two arguments), which would not survive forwarding.
    """
    found = []
    for arg in argv:
        if arg.startswith("--config."):
            if "=" not in arg:
                raise app.UsageError(f"Write {arg}=VALUE (one argument) to forward it.")
            found.append(arg)
    return tuple(found)


def main(argv):
    del argv
    config = _CONFIG.value
    tpu = parallel.get_slice(_SLICE.value)
    if not (ROOT / "experiments" / f"{_MAIN.value}.py").exists():
        raise app.UsageError(f"No experiments/{_MAIN.value}.py; --main names an experiment main.")
    # The mesh must fit the slice: checked here, not on the pod.
    try:
        shape = parallel.mesh_shape(tpu.devices, **dict(config.get("mesh") or {}))
    except ValueError as error:
        raise app.UsageError(f"The config's mesh does not fit {tpu.name}: {error}") from None
    try:
        config_arg = launch.config_for_workers(
            config_flags.get_config_filename(flags.FLAGS["config"]), ROOT
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    # Copied from this checkout: the workers run its committed config (with --repo, the
    # clone's, which cannot be checked from here).
    unshipped = "" if _REPO.value else launch.uncommitted(config_arg, ROOT, _REF.value)
    run = launch.TpuRun(
        name=_NAME.value,
        zone=_ZONE.value,
        slice=_SLICE.value,
        main=_MAIN.value,
        config=config_arg,
        workdir=_WORKDIR.value,
        overrides=config_overrides(sys.argv[1:]),
        project=_PROJECT.value,
        spot=_SPOT.value,
        repo=_REPO.value,
        ref=_REF.value,
        detach=_DETACH.value,
    )
    unset = launch.placeholders(config.to_dict())
    steps = launch.steps(run, _ACTION.value)
    if _DRY_RUN.value:
        mesh = dict(zip(parallel.MESH_AXES, shape, strict=True))
        print(f"# {tpu.name}: {tpu.devices} devices on {tpu.hosts} workers, mesh {mesh}")
        for name in unset:
            print(f"# {name} still holds {launch.PLACEHOLDER}: set --{name}=gs://...")
        if unshipped:
            print(f"# {unshipped}")
        print(launch.format_steps(steps))
        return
    if unshipped and _ACTION.value in ("all", "run"):
        raise app.UsageError(f"{unshipped}.")
    if unset and _ACTION.value in ("all", "run"):
        raise app.UsageError(
            f"{', '.join(unset)} still hold {launch.PLACEHOLDER}; set them, e.g. "
            f"--{unset[0]}=gs://my-bucket/..."
        )
    launch.execute(steps)


if __name__ == "__main__":
    app.run(main)
