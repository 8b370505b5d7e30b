"""The flags every experiment main takes: --config (an ml_collections config file) and --workdir."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if non-empty.")
flags.mark_flag_as_required("workdir")


def preemptible(main):
    """`main` for `app.run`, exiting with `Preempted.exit_code` (143 after SIGTERM, 130 after
    Ctrl-C; see interp/preemption.py) when the job stopped on a preemption notice, after
    its checkpoint was committed: a log line, not a traceback."""
    from absl import logging

    from interp import preemption

    def run(argv):
        try:
            return main(argv)
        except preemption.Preempted as stopped:
            logging.warning("Exiting with %d: %s", stopped.exit_code, stopped)
            return stopped.exit_code

    return run
