r"""Trains a language model (by default the embedded demo model) and exports it.

python -m experiments.train_lm --config=configs/demo.py --workdir=workdir/demo
"""

from absl import app, flags
from ml_collections import config_flags

from interp import experiment
from interp.models import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if non-empty.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    experiment.quiet_library_logs()
    summary = train.run(_CONFIG.value, _WORKDIR.value)
    print(f"Sample: {summary['sample']}")
    print(
        f"Held-out loss {summary['eval_loss']:.3f} nats/token vs unigram "
        f"{summary['unigram_loss']:.3f}; model exported to {summary['export_dir']}"
    )


if __name__ == "__main__":
    app.run(main)
