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

`config.stages` chooses the stages, e.g. a model studied as it is, without the LM stage:

    python -m experiments.pipeline --config=configs/demo.py --workdir=workdir/study \
        --config.stages=sae,analysis,steer
"""

from experiments import common
from interp import parallel, paths
from interp.jobs import analyse, influence, lm, results, sae, steer
from interp.jobs import workdir as workdir_lib

STAGES = ("lm", "sae", "influence", "analysis", "steer")


def stages_of(config) -> tuple[str, ...]:
    """`config.stages` (a tuple or a comma-separated string), in pipeline order.

    Raises:
      ValueError: for an unknown stage, naming the known ones.
    """
    given = config.get("stages") or STAGES
    names = [s.strip() for s in (given.split(",") if isinstance(given, str) else given)]
    unknown = sorted(set(names) - set(STAGES))
    if unknown or not names:
        raise ValueError(f"config.stages {given!r}: choose among {STAGES} (in any order).")
    return tuple(s for s in STAGES if s in names)


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    config = common.CONFIG.value
    workdir = common.WORKDIR.value
    stages = stages_of(config)
    if "lm" in stages:
        lm.run(config, workdir_lib.stage(workdir, "lm"))
    if "sae" in stages:
        sae.run(config, workdir_lib.stage(workdir, "sae"))
    if "influence" in stages:
        influence.run(config, workdir_lib.stage(workdir, "influence"))
    searched = None
    if "analysis" in stages:
        searched = analyse.run(config, workdir_lib.stage(workdir, "analysis"))
    if "steer" in stages:
        steering = config
        if searched is not None:
            steering = config.copy_and_resolve_references()
            with steering.unlocked():
                steering.steering.sae = searched["sae"]  # The feature indexes this SAE.
                steering.steering.feature = searched["feature"]
        steer.run(steering, workdir_lib.stage(workdir, "steer"))
    found = results.summarize(workdir)
    parallel.on_main_process(paths.write_text, paths.resolve(workdir) / results.RESULTS_FILE, found)
    if parallel.is_main_process():
        print(f"\nWhat the run found ({workdir}/{results.RESULTS_FILE}):\n\n{found}")
        if searched is not None:
            print(f"Dashboard: {searched['dashboard']}")
        if "influence" in stages:
            print(f"Influence report: {workdir}/influence/report/report.html")
        if "steer" in stages:
            print(f"Steering sweep: {workdir}/steer/{steer.SWEEP_PLOT}")


if __name__ == "__main__":
    common.run(main)
