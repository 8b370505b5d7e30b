r"""The whole pipeline, stage after stage, each in its own folder under the workdir.

    python -m experiments.pipeline --config=configs/demo.py --workdir=workdir/demo

Stages: lm (train and export the language model, experiments/train_lm.py), sae (harvest its
activations, train and evaluate SAEs, experiments/train_sae.py) and influence (EK-FAC factors
on its training rows, influence of those rows on the configured queries and on an SAE
feature, experiments/influence.py), analysis (feature statistics and the dashboard of the first
TopK SAE, and a feature search for `config.analysis.concept`, interp/jobs/analyse.py) and steer
(the feature found clamped to multiples of its maximum while completing
`config.steering.prompt`, experiments/steer.py). Re-running resumes.
"""

from experiments import common
from interp.jobs import analyse, influence, lm, sae, steer
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
    found = influence.run(config, workdir_lib.stage(common.WORKDIR.value, "influence"))
    print("Most influential training rows (report: influence/report/report.html):")
    print(influence.format_summary(found))
    searched = analyse.run(config, workdir_lib.stage(common.WORKDIR.value, "analysis"))
    print(f"Dashboard: {searched['dashboard']}")
    print(analyse.format_search(searched))
    steering = config.copy_and_resolve_references()
    with steering.unlocked():
        steering.steering.sae = searched["sae"]  # The feature is an index into this SAE.
        steering.steering.feature = searched["feature"]
    results = steer.run(steering, workdir_lib.stage(common.WORKDIR.value, "steer"))
    print(steer.format_side_by_side(results))


if __name__ == "__main__":
    common.run(main)
