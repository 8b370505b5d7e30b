r"""Trains sparse autoencoders on a model's activations, evaluates and exports them.

    python -m experiments.train_sae --config=configs/demo.py --workdir=workdir/demo/sae \
        --config.sae.model_path=workdir/demo/lm/export
"""

from absl import app

from experiments import common
from interp import experiment
from interp.sae import job


def main(argv):
    del argv
    experiment.quiet_library_logs()
    results = job.run(common.CONFIG.value, common.WORKDIR.value)
    print(job.format_table(results))


if __name__ == "__main__":
    app.run(main)
