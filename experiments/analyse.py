r"""Analysis of an SAE: feature statistics and the dashboard over held-out text, and a feature
search for `config.analysis.concept`, on any model source.

    python -m experiments.analyse --config=configs/demo.py --workdir=workdir/demo/analysis
    python -m experiments.analyse --config=configs/demo.py --workdir=/tmp/analysis \
        --config.analysis.model_path=HuggingFaceTB/SmolLM2-135M \
        --config.analysis.sae=/path/to/sae_folder

`model_path` '' and `sae` '' are the pipeline's LM and first TopK SAE beside the workdir
(`<workdir>/../lm/export`, `<workdir>/../sae/...`); any Hugging Face folder, GGUF file or Hub
id, and any SAE folder (or hf:// folder) otherwise.
"""

from experiments import common
from interp.jobs import analyse
from interp.jobs import workdir as workdir_lib


def main(argv):
    del argv
    workdir_lib.quiet_library_logs()
    searched = analyse.run(common.CONFIG.value, common.WORKDIR.value)
    print(f"Dashboard: {searched['dashboard']}")
    print(analyse.format_search(searched))


if __name__ == "__main__":
    common.run(main)
