"""The cheapest real job: `python -m tests.jobs.lock_holder --workdir=W` holds W, as every
experiment main does (through experiments/common.run), and does nothing else.

Prints 'holding <pid>' once it holds the workdir, appends one line to
`<workdir>/metrics.jsonl` (local workdirs), and waits for a line on stdin (or its end)
before exiting 0. tests/jobs/lock_test.py starts it as a real subprocess.
"""

import json
import os
import sys

from experiments import common
from interp import paths


def main(argv):
    del argv
    workdir = paths.resolve(common.WORKDIR.value)
    if not paths.is_remote(workdir):
        workdir.mkdir(parents=True, exist_ok=True)  # As prepare_workdir does.
        with open(workdir / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps({"pid": os.getpid()}) + "\n")
    print(f"holding {os.getpid()}", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    common.run(main)
