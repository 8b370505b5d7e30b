r"""Trains sparse autoencoders on a model's activations, evaluates and exports them.

    python -m experiments.train_sae --config=configs/demo.py --workdir=workdir/demo/sae \
        --config.sae.model_path=workdir/demo/lm/export
"""

from absl import app, flags
from ml_collections import config_flags

from interp import experiment
from interp.sae import job

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if non-empty.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    experiment.quiet_library_logs()
    results = job.run(_CONFIG.value, _WORKDIR.value)
    print(job.format_table(results))


if __name__ == "__main__":
    app.run(main)
