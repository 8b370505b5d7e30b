r"""Prints what a pipeline run found, from its result files; optionally writes it into a
README between its demo-results markers (interp/jobs/results.py).

    python -m experiments.results --workdir=workdir/demo
    python -m experiments.results --workdir=workdir/demo --readme=README.md
"""

from absl import app, flags

from interp.jobs import results

WORKDIR = flags.DEFINE_string("workdir", None, "The pipeline's workdir (local or gs://).")
README = flags.DEFINE_string("readme", None, "A Markdown file to write the results into.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    text = results.summarize(WORKDIR.value)
    print(text)
    if README.value:
        results.write_readme_block(README.value, text)
        print(f"Written into {README.value}.")


if __name__ == "__main__":
    app.run(main)
