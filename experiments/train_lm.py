r"""Trains a language model (by default the embedded demo model) and exports it.

python -m experiments.train_lm --config=configs/demo.py --workdir=workdir/demo/lm
"""

from experiments import common
from interp.jobs import lm
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    summary = lm.run(common.CONFIG.value, common.WORKDIR.value)
    print(
        f"Held-out loss {summary['eval_loss']:.3f} nats/token vs unigram "
        f"{summary['unigram_loss']:.3f}; model exported to {summary['export_dir']}"
    )


if __name__ == "__main__":
    common.run(main)
