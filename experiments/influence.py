r"""Influence functions with EK-FAC: fit factors on a model's training rows (or reuse them),
then find the rows that most influence each query, by layer and token, and write a report.

    python -m experiments.influence --config=configs/demo.py --workdir=workdir/demo/influence
"""

from experiments import common
from interp.jobs import influence
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    results = influence.run(common.CONFIG.value, common.WORKDIR.value)
    print(influence.format_summary(results))


if __name__ == "__main__":
    common.run(main)
