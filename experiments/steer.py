r"""Steering with an SAE feature: a prompt's completions with the feature clamped to several
multiples of its maximum activation, side by side with the unsteered one; with
`config.steering.sweep_prompts`, the measured sweep (concept share and fluency per method,
positions and strength; interp/jobs/steer.py).

    python -m experiments.steer --config=configs/demo.py --workdir=workdir/demo/steering
"""

from experiments import common
from interp.jobs import steer
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    results = steer.run(common.CONFIG.value, common.WORKDIR.value)
    print(steer.format_side_by_side(results))
    if results.get("sweep"):
        print(steer.format_sweep(results["sweep"]))


if __name__ == "__main__":
    common.run(main)
