r"""A TopK SAE sweep, 65k to 1M latents, on Gemma 2 2B's residual stream, on a TPU slice.

    python -m experiments.launch_tpu --name=gemma-sae --zone=us-central2-b --slice=v4-32 \
        --main=train_sae --config=configs/gemma2_2b_sae.py:slice=v4-32 \
        --config.sae.model_path=gs://my-bucket/models/gemma-2-2b \
        --config.data.text_path='gs://my-bucket/data/fineweb/sample-10BT/*.parquet' \
        --config.sae.cache_path=gs://my-bucket/cache/gemma-2-2b/blocks_12 \
        --workdir=gs://my-bucket/runs/gemma-sae --spot

Arguments (`:slice=v4-32,layer=12,width=0`): `slice`, a TPU preset of interp.parallel.SLICES
(the mesh puts the SAEs' latents over all its chips); `layer`, the block whose resid_post is
read; `width`, 0 for all (five TopK SAEs of 2^16 ... 2^20 latents, trained together on the same
batches) or one of those widths (one SAE per run: the harvested cache at `sae.cache_path` is
shared, so later widths reuse it). It is `configs/demo.py` with another model, data, sizes and
mesh: the model is the Hugging Face folder of google/gemma-2-2b copied to Cloud Storage
(docs/real_runs.md), the text FineWeb parquet files (a web corpus like Gemma's
undisclosed one). Memory and time: docs/real_runs.md.
"""

from configs import common, demo
from interp import parallel

WIDTHS = (2**16, 2**17, 2**18, 2**19, 2**20)  # 65,536 ... 1,048,576 latents.


def get_config(arg=None):
    arg = common.parse_arg(arg, slice="v4-32", layer=12, width=0)
    if arg.width and arg.width not in WIDTHS:
        raise ValueError(f"width={arg.width!r}: 0 (all) or one of {WIDTHS}.")
    widths = (arg.width,) if arg.width else WIDTHS
    tpu = parallel.get_slice(arg.slice)
    c = demo.get_config("toy=True")  # The demo's stages and fields, not its SmolLM2 sizes.
    c.data.text_path = "gs://YOUR_BUCKET/data/fineweb/sample-10BT/*.parquet"
    c.data.seq_len = 1024  # Gemma Scope's SAEs were trained on 1024-token contexts.
    # Parquet is streamed: the job reads only the documents its ~100k rows of 1024 tokens need.
    c.mesh = dict(data=-1, fsdp=1, model=tpu.devices)  # Latents over every chip.
    site = f"blocks_{arg.layer}/resid_post"
    c.sae.update(
        model_path="gs://YOUR_BUCKET/models/gemma-2-2b",
        sites=(site,),
        cache_path=f"gs://YOUR_BUCKET/cache/gemma-2-2b/blocks_{arg.layer}.resid_post",
        harvest_rows=100_000_000,  # 100M tokens x 2304 x bf16 = 461 GB of cache.
        harvest_batch_size=16,  # Sequences per harvesting forward pass (one chip).
        num_latents=WIDTHS[0],
        saes=tuple(dict(architecture="topk", k=64, num_latents=width) for width in widths),
        eval_batch_size=8,
        eval_batches=32,
    )
    c.sae.train.update(
        steps=50_000,  # x 4096 rows = 205M rows, about two passes over the cache.
        batch_size=4096,
        warmup_steps=1000,
        log_every=100,
        checkpoint_every=1000,
    )
    return c
