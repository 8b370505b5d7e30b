r"""Fits (or resumes fitting) EK-FAC influence factors on a model's training rows.

python -m experiments.fit_factors --config=configs/demo.py --workdir=workdir/demo/influence
"""

from experiments import common
from interp.jobs import influence
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    factors = influence.fit(common.CONFIG.value, common.WORKDIR.value)
    print(
        f"{factors.strategy} factors of {len(factors.modules)} modules over "
        f"{factors.num_tokens} tokens / {factors.num_sequences} sequences."
    )


if __name__ == "__main__":
    common.run(main)
