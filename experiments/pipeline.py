r"""The whole pipeline, stage after stage, each in its own folder under the workdir.

    python -m experiments.pipeline --config=configs/demo.py --workdir=workdir/demo

Stages: lm (fine-tune the pretrained model, or train the toy LM, and export it;
experiments/train_lm.py), sae (harvest a model's activations, train and evaluate SAEs with
them spliced in; experiments/train_sae.py), influence (EK-FAC factors on the LM's training
rows, the influence of those rows on the configured queries and, with a plant, the planted
rows' ranks; experiments/influence.py), analysis (feature statistics, the dashboard of the
first TopK SAE and a feature search for `config.analysis.concept`; experiments/analyse.py)
and steer (the feature found, clamped or added while completing prompts without the
concept, measured; experiments/steer.py). Each stage logs its progress; the pipeline ends
by printing what the run found (`interp.jobs.results`), also written to
`<workdir>/results.md`. Re-running resumes; a stage's main runs it alone.
"""

from experiments import common
from interp import parallel, paths
from interp.jobs import analyse, influence, lm, results, sae, steer
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    config = common.CONFIG.value
    workdir = common.WORKDIR.value
    lm.run(config, workdir_lib.stage(workdir, "lm"))
    sae.run(config, workdir_lib.stage(workdir, "sae"))
    influence.run(config, workdir_lib.stage(workdir, "influence"))
    searched = analyse.run(config, workdir_lib.stage(workdir, "analysis"))
    steering = config.copy_and_resolve_references()
    with steering.unlocked():
        steering.steering.sae = searched["sae"]  # The feature is an index into this SAE.
        steering.steering.feature = searched["feature"]
    steer.run(steering, workdir_lib.stage(workdir, "steer"))
    found = results.summarize(workdir)
    parallel.on_main_process(paths.write_text, paths.resolve(workdir) / results.RESULTS_FILE, found)
    if parallel.is_main_process():
        print(f"\nWhat the run found ({workdir}/{results.RESULTS_FILE}):\n\n{found}")
        print(f"Dashboard: {searched['dashboard']}")
        print(f"Influence report: {workdir}/influence/report/report.html")
        print(f"Steering sweep: {workdir}/steer/{steer.SWEEP_PLOT}")


if __name__ == "__main__":
    common.run(main)
