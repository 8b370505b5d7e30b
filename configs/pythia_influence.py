r"""EK-FAC influence of Pythia-410m-deduped's training text on its completions.

    python -m experiments.launch_tpu --name=pythia-influence --zone=us-central2-b \
        --slice=v4-8 --main=influence \
        --config=configs/pythia_influence.py:slice=v4-8 \
        --config.influence.model_path=gs://my-bucket/models/pythia-410m-deduped \
        --config.data.text_path='gs://my-bucket/data/pile-deduped/*.parquet' \
        --workdir=gs://my-bucket/runs/pythia-influence

Arguments (`:slice=v4-8`): the TPU slice or GPU node (interp.parallel.SLICES); the
batches are split over all its devices, the model replicated. It is `configs/demo.py` with
another model, data, sizes and mesh: EleutherAI/pythia-410m-deduped (a Hugging Face folder
copied to Cloud Storage, docs/real_runs.md), the deduplicated Pile it was trained on
(EleutherAI/the_pile_deduplicated, parquet), factors of every MLP projection (48 layers), and
the demo's three completion queries (the Pile holds Project Gutenberg). No SAE feature query:
this run trains no SAE. Memory and time: docs/real_runs.md.
"""

from configs import common, demo
from interp import parallel


def get_config(arg=None):
    arg = common.parse_arg(arg, slice="v4-8")
    devices = parallel.get_slice(arg.slice).devices
    c = demo.get_config("toy=True")  # The demo's stages and fields, not its SmolLM2 sizes.
    c.data.text_path = "gs://YOUR_BUCKET/data/pile-deduped/*.parquet"
    c.data.seq_len = 2048  # Pythia's training context.
    # Parquet is streamed: the job reads only the documents its fit and search rows need.
    c.mesh = dict(data=devices, fsdp=1, model=1)
    c.influence.update(
        model_path="gs://YOUR_BUCKET/models/pythia-410m-deduped",
        fit_rows=65_536,  # 134M tokens for the covariances and the eigenvalue correction.
        search_rows=65_536,
        candidates=1024,  # TF-IDF candidates scored per query.
        batch_size=devices,  # One sequence of 2048 tokens per device.
        checkpoint_every=256,
        feature_queries=(),
    )
    return c
