"""The flags every experiment main takes: --config (an ml_collections config file) and --workdir."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if non-empty.")
flags.mark_flag_as_required("workdir")
