r"""TopK SAE training throughput: ours (JAX) against EleutherAI sparsify (PyTorch), same device.

    python benchmarks/sae_throughput.py                # GPU sizes from the issue
    python benchmarks/sae_throughput.py --sizes=cpu    # reduced sizes for a CPU machine

Each row times full training steps on random activations: forward, backward, optimizer
update, decoder renormalisation (both libraries), with AuxK enabled but no latent dead yet
(both libraries then skip its top-k and decode; a healthy run is mostly in this state).
Ours runs one jitted step on all local devices (batch over 'data'); sparsify runs its
SparseCoder forward + backward + Adam on the same device. The table reports tokens/s, the
speed-up, and our fraction of the encoder-matmul limit: the tokens/s of a bare dense
[B, D] x [D, X] matmul in the compute dtype, the one piece of dense work a TopK step cannot
avoid.

The last column runs our step with `sparse_kernels=False` (dense [B, X] codes and matmuls for
the decoder and the encoder's gradient), to show what the sparse kernels buy on the device.
A second table times the top-k alone on the same [batch, latents] pre-activations: XLA's
`lax.top_k` (a sort of whole rows on CPU, and on GPU for k > 16 unless XLA's RAFT select-k is
switched on: `--raft_top_k` sets `--xla_gpu_experimental_use_raft_select_k=true`), our
grouped `kernels.top_k` (what the step uses), and torch.topk (what sparsify uses).

Needs `eai-sparsify` installed beside interp (`pip install eai-sparsify torch==2.13.0` on CPU
machines); without it the sparsify column is empty.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import time

import jax
import jax.numpy as jnp

from interp import parallel
from interp.sae import kernels
from interp.sae import train as sae_train
from interp.sae.modules import SAEConfig

GPU_SIZES = ((768, 32768, 32, 4096), (768, 32768, 32, 16384), (2304, 65536, 64, 8192))
CPU_SIZES = (
    (256, 4096, 32, 1024),
    (256, 4096, 32, 4096),
    (512, 8192, 64, 2048),
    (768, 32768, 32, 1024),  # the first shape at a CPU-sized batch
)


def _time(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def ours(d, x, k, batch, steps, warmup, dtype, sparse_kernels=True):
    config = SAEConfig(
        architecture="topk", d_in=d, num_latents=x, k=k, dtype=dtype, sparse_kernels=sparse_kernels
    )
    train_config = sae_train.TrainConfig(steps=10_000, warmup_steps=10)
    mesh = parallel.make_mesh(data=-1)
    rules = parallel.DEFAULT_RULES
    state = sae_train.init_state((config,), train_config, jax.random.key(0), mesh, rules)
    step = sae_train.make_train_step((config,), train_config, mesh, rules)
    data = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
    data = jax.device_put(data, parallel.batch_sharding(mesh, rules, 2, shape=data.shape))
    box = [state]

    def one():
        box[0], metrics = step(box[0], data)
        jax.block_until_ready(metrics)

    return batch / _time(one, steps, warmup)


def matmul_limit(d, x, batch, steps, warmup, dtype):
    a = jax.random.normal(jax.random.key(0), (batch, d), dtype)
    w = jax.random.normal(jax.random.key(1), (d, x), dtype)
    matmul = jax.jit(lambda a, w: a @ w)
    return batch / _time(lambda: jax.block_until_ready(matmul(a, w)), steps, warmup)


def top_k_times(x, k, batch, steps, warmup, dtype):
    """Milliseconds per top-k of [batch, x] pre-activations.

    Per row (TopK): lax.top_k, ours (`kernels.top_k`, grouped), torch.topk (None without
    torch). Whole batch (BatchTopK, the top k * batch of all entries, ReLU'd): lax.top_k
    over the flattened array and ours from per-row candidates (`kernels.candidate_top_k`,
    which `flat_top_k` uses off CPU).
    """
    pre = jax.random.normal(jax.random.key(2), (batch, x), dtype)
    relu = jax.nn.relu(pre)
    calls = (
        (jax.lax.top_k, pre, k),
        (kernels.top_k, pre, k),
        (lambda v, n: jax.lax.top_k(v.reshape(-1), n), relu, k * batch),
        (kernels.candidate_top_k, relu, k * batch),
    )
    times = {}
    names = ("lax", "ours", "lax_flat", "ours_flat")
    for name, (fn, values, count) in zip(names, calls, strict=True):
        jitted = jax.jit(fn, static_argnums=1)
        one = functools.partial(lambda f, *a: jax.block_until_ready(f(*a)), jitted, values, count)
        times[name] = 1e3 * _time(one, steps, warmup)
    times["torch"] = None
    try:
        import torch
    except ImportError:
        return times
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    values = torch.randn(batch, x, device=device, dtype=torch_dtype)

    def one():
        torch.topk(values, k, dim=-1, sorted=False)
        if device == "cuda":
            torch.cuda.synchronize()

    times["torch"] = 1e3 * _time(one, steps, warmup)
    return times


def sparsify(d, x, k, batch, steps, warmup, dtype):
    try:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    sae = SparseCoder(d, SparseCoderConfig(num_latents=x, k=k), device=device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    data = torch.randn(batch, d, device=device)
    # No latent dead, as in ours at the start: both run the AuxK check and skip its work.
    dead = torch.zeros(x, dtype=torch.bool, device=device)

    def one():
        with torch.autocast(device, dtype=torch_dtype, enabled=dtype == "bfloat16"):
            out = sae(data, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        if device == "cuda":
            torch.cuda.synchronize()

    return batch / _time(one, steps, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default by sizes)")
    parser.add_argument(
        "--raft_top_k", action="store_true", help="turn on XLA's RAFT select-k for lax.top_k (GPU)"
    )
    args = parser.parse_args()
    if args.raft_top_k:  # Read when the backend starts, which is below.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_experimental_use_raft_select_k=true"
    sizes = GPU_SIZES if args.sizes == "gpu" else CPU_SIZES
    dtype = args.dtype or ("bfloat16" if args.sizes == "gpu" else "float32")
    device = jax.devices()[0].device_kind
    raft = " | XLA RAFT select-k on" if args.raft_top_k else ""
    print(f"# {datetime.date.today()} | {device} x{jax.device_count()} | dtype {dtype}{raft}")
    print(
        "| d_in | latents | k | batch | ours tok/s | sparsify tok/s | speed-up | of matmul limit "
        "| ours, dense kernels tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for d, x, k, batch in sizes:
        ours_rate = ours(d, x, k, batch, args.steps, args.warmup, dtype)
        limit = matmul_limit(d, x, batch, args.steps, args.warmup, jnp.dtype(dtype))
        peer = sparsify(d, x, k, batch, args.steps, args.warmup, dtype)
        dense = ours(d, x, k, batch, args.steps, args.warmup, dtype, sparse_kernels=False)
        peer_text = f"{peer / 1e3:.1f}k" if peer else "n/a"
        speedup = f"{ours_rate / peer:.2f}x" if peer else "n/a"
        print(
            f"| {d} | {x} | {k} | {batch} | {ours_rate / 1e3:.1f}k | {peer_text} | {speedup} "
            f"| {ours_rate / limit:.0%} | {dense / 1e3:.1f}k |",
            flush=True,
        )
    print(
        "\n| latents | k | batch | per row: lax.top_k ms | ours ms | torch.topk ms "
        "| whole batch: lax.top_k ms | ours ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    top_k_sizes = [(x, k, batch) for _, x, k, batch in sizes]
    top_k_sizes.append((1 << 20, 32, 256 if args.sizes == "gpu" else 64))  # 1M latents.
    for x, k, batch in top_k_sizes:
        ms = top_k_times(x, k, batch, args.steps, args.warmup, jnp.dtype(dtype))
        torch_text = f"{ms['torch']:.2f}" if ms["torch"] is not None else "n/a"
        print(
            f"| {x} | {k} | {batch} | {ms['lax']:.2f} | {ms['ours']:.2f} | {torch_text} "
            f"| {ms['lax_flat']:.2f} | {ms['ours_flat']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    main()
