r"""SAEs on GPT-2 small's residual stream, on one GPU.

    python -m experiments.train_sae --config=configs/gpt2_sae.py --workdir=workdir/gpt2-sae

Arguments (`:layer=8,slice=h100-1`): `layer`, the block whose resid_pre is read; `slice`, the
machine (interp.parallel.SLICES; its devices all hold the batch). It is `configs/demo.py` with
another model, data, sizes and mesh: the demo's four SAE architectures at 32x the width of the
residual stream (24,576 latents), on the Hugging Face folder of openai-community/gpt2 (local,
or gs://) and OpenWebText parquet files (the open replica of GPT-2's WebText). Download both
first (docs/real_runs.md). Memory and time: docs/real_runs.md.
"""

from configs import common, demo
from interp import parallel


def get_config(arg=None):
    arg = common.parse_arg(arg, layer=8, slice="h100-1")
    gpu = parallel.get_slice(arg.slice)
    c = demo.get_config("toy=True")  # The demo's stages and fields, not its SmolLM2 sizes.
    c.data.text_path = "data/openwebtext/*.parquet"
    c.data.seq_len = 1024  # GPT-2's context.
    c.mesh = dict(data=gpu.devices, fsdp=1, model=1)
    c.sae.update(
        model_path="models/gpt2",
        sites=(f"blocks_{arg.layer}/resid_pre",),
        harvest_rows=50_000_000,  # 50M tokens x 768 x bf16 = 77 GB of cache.
        harvest_batch_size=64,
        num_latents=32 * 768,
        eval_batch_size=16,
        eval_batches=64,
    )
    c.sae.saes = tuple(dict(s, k=32) if "k" in s else s for s in c.sae.saes)
    c.sae.train.update(
        steps=30_000,  # x 4096 rows = 123M rows, about 2.5 passes over the cache.
        batch_size=4096,
        warmup_steps=1000,
        log_every=100,
        checkpoint_every=1000,
    )
    return c
