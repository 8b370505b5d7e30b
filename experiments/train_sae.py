r"""Trains sparse autoencoders on a model's activations, evaluates and exports them.

    python -m experiments.train_sae --config=configs/demo.py --workdir=workdir/demo/sae \
        --config.sae.model_path=workdir/demo/lm/export
"""

from experiments import common
from interp.jobs import sae
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    results = sae.run(common.CONFIG.value, common.WORKDIR.value)
    print(sae.format_table(results))


if __name__ == "__main__":
    common.run(main)
