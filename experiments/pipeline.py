r"""The whole pipeline, stage after stage, each in its own folder under the workdir.

    python -m experiments.pipeline --config=configs/demo.py --workdir=workdir/demo

Stages: lm (train and export the language model, experiments/train_lm.py) and sae (harvest
its activations, train and evaluate SAEs, experiments/train_sae.py). Re-running resumes.
"""

from absl import app

from experiments import common
from interp.jobs import lm, sae
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    config = common.CONFIG.value
    summary = lm.run(config, workdir_lib.stage(common.WORKDIR.value, "lm"))
    print(f"LM sample: {summary['sample']}")
    print(
        f"LM held-out loss {summary['eval_loss']:.3f} nats/token vs unigram "
        f"{summary['unigram_loss']:.3f}; exported to {summary['export_dir']}"
    )
    results = sae.run(config, workdir_lib.stage(common.WORKDIR.value, "sae"))
    print("SAEs on held-out text:")
    print(sae.format_table(results))


if __name__ == "__main__":
    app.run(main)
