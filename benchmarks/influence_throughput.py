r"""EK-FAC influence throughput: ours (JAX) against kronfluence (PyTorch), same device, one run.

    python benchmarks/influence_throughput.py                 # GPU sizes from the issue
    python benchmarks/influence_throughput.py --sizes=cpu     # reduced sizes for a CPU machine

A GPT-NeoX-shaped model with random weights (ours, exported and loaded by `transformers` for
kronfluence, so both see identical weights), every MLP projection tracked, the empirical
Fisher (the data's own next tokens: deterministic and identical work in both). Stages, as
kronfluence reports them: covariance (tokens/s), eigendecomposition (s), eigenvalue
correction (tokens/s), pairwise scores (training tokens/s for all queries at once). Each
stage runs once to warm up (compilation, allocator) and is then timed. The last column
checks that the two libraries' scores agree (Spearman per query, minimum).

Needs `kronfluence` installed beside interp (`pip install kronfluence==1.0.1 torch==2.13.0`,
then `pip uninstall -y torchvision` on CPU machines); without it the peer columns are empty.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time

import jax
import numpy as np

from interp import influence, models
from interp.influence import factors as factors_lib
from interp.influence import gradients
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params

# (name, layers, width, heads, vocab, seq_len, fit sequences, queries, train sequences, batch)
GPU_SIZES = (("pythia-160m", 12, 768, 12, 50304, 512, 256, 8, 128, 8),)
CPU_SIZES = (("4x256", 4, 256, 4, 4096, 128, 64, 8, 32, 8),)


def _config(layers, width, heads, vocab, seq_len):
    return ModelConfig(
        family="gpt_neox", vocab_size=vocab, d_model=width, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=width // heads, mlp_dim=4 * width,
        max_len=seq_len, positions="rotary", rotary_fraction=0.25, parallel_residual=True,
        activation="gelu", tied_embeddings=False,
    )  # fmt: skip


def _data(rows, seq_len, vocab, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones((rows, seq_len), np.float32)}


def _split(batch, size):
    return [
        {k: v[i : i + size] for k, v in batch.items()} for i in range(0, len(batch["tokens"]), size)
    ]


def _timed(fn):
    fn()  # Warm-up: compilation and allocation.
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def ours(model, params, fit, queries, train, batch):
    modules = gradients.tracked_modules(model)
    fit_batches, train_batches = _split(fit, batch), _split(train, batch)
    options = dict(sample_labels=False)
    cov_s, (sums, tokens) = _timed(lambda: _block(factors_lib.covariance_sums(
        model, params, fit_batches, modules, **options)))  # fmt: skip
    eig_s, bases = _timed(lambda: factors_lib.eigendecompose(sums, tokens))
    lam_s, (totals, sequences) = _timed(lambda: _block(factors_lib.correction_sums(
        model, params, fit_batches, modules, bases, **options)))  # fmt: skip
    fitted = influence.fit_factors(model, params, fit_batches, sample_labels=False)
    score_s, scores = _timed(lambda: influence.pairwise_scores(
        model, params, fitted, [queries], train_batches))  # fmt: skip
    fit_tokens = fit["tokens"].size
    return {
        "covariance": fit_tokens / cov_s,
        "eigendecomposition": eig_s,
        "correction": fit_tokens / lam_s,
        "scores": train["tokens"].size / score_s,
    }, scores


def kronfluence_run(folder, num_layers, fit, queries, train, batch):
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from transformers import AutoModelForCausalLM

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["tokens"]).logits[:, :-1].float()
            labels = batch["tokens"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
            ).reshape(labels.shape)
            return (nll * batch["loss_mask"][:, 1:]).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            names = ("dense_h_to_4h", "dense_4h_to_h")
            return [f"gpt_neox.layers.{i}.mlp.{n}" for i in range(num_layers) for n in names]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = {k: torch.tensor(v) for k, v in data.items()}
            self.data["tokens"] = self.data["tokens"].long()

        def __len__(self):
            return len(self.data["tokens"])

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.data.items()}

    device_is_cpu = not torch.cuda.is_available()
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    task = LanguageModelTask()
    hf = prepare_model(hf, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", hf, task, cpu=device_is_cpu, disable_tqdm=True,
                            output_dir=out)  # fmt: skip
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        common = dict(dataset=Rows(fit), per_device_batch_size=batch, factor_args=args,
                      overwrite_output_dir=True)  # fmt: skip
        cov_s, _ = _timed(lambda: analyzer.fit_covariance_matrices("f", **common))
        eig_s, _ = _timed(lambda: analyzer.perform_eigendecomposition(
            "f", factor_args=args, overwrite_output_dir=True))  # fmt: skip
        lam_s, _ = _timed(lambda: analyzer.fit_lambda_matrices("f", **common))
        n_queries = len(queries["tokens"])
        score_s, _ = _timed(lambda: analyzer.compute_pairwise_scores(
            "s", "f", Rows(queries), Rows(train), per_device_query_batch_size=n_queries,
            per_device_train_batch_size=batch, score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True))  # fmt: skip
        scores = analyzer.load_pairwise_scores("s")["all_modules"].numpy()
    return {
        "covariance": fit["tokens"].size / cov_s,
        "eigendecomposition": eig_s,
        "correction": fit["tokens"].size / lam_s,
        "scores": train["tokens"].size / score_s,
    }, scores


def _spearman(x, y):
    rx, ry = (np.argsort(np.argsort(v)).astype(np.float64) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _rate(value):
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", choices=("gpu", "cpu"), default="gpu")
    args = parser.parse_args()
    sizes = GPU_SIZES if args.sizes == "gpu" else CPU_SIZES
    device = jax.devices()[0]
    print(f"# {datetime.date.today()} | {device.platform} x{jax.device_count()} | float32")
    print("| model | seq | stage | ours | kronfluence | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, layers, width, heads, vocab, seq_len, n_fit, n_query, n_train, batch in sizes:
        config = _config(layers, width, heads, vocab, seq_len)
        model, params = Transformer(config), init_params(config, 0)
        fit = _data(n_fit, seq_len, vocab, 0)
        queries, train = _data(n_query, seq_len, vocab, 1), _data(n_train, seq_len, vocab, 2)
        figures, scores = ours(model, params, fit, queries, train, batch)
        try:
            with tempfile.TemporaryDirectory() as folder:
                models.save_pretrained(folder, model, params)
                peer, peer_scores = kronfluence_run(folder, layers, fit, queries, train, batch)
            rho = min(_spearman(scores[q], peer_scores[q]) for q in range(n_query))
        except ImportError as error:
            print(f"(kronfluence unavailable: {error})")
            peer, rho = {}, float("nan")
        for stage in ("covariance", "eigendecomposition", "correction", "scores"):
            mine, theirs = figures[stage], peer.get(stage)
            if stage == "eigendecomposition":
                shown = f"{mine:.2f} s", "--" if theirs is None else f"{theirs:.2f} s"
                speed = "--" if theirs is None else f"{theirs / mine:.1f}x"
            else:
                shown = f"{_rate(mine)} tok/s", "--" if theirs is None else f"{_rate(theirs)} tok/s"
                speed = "--" if theirs is None else f"{mine / theirs:.1f}x"
            print(f"| {name} | {seq_len} | {stage} | {shown[0]} | {shown[1]} | {speed} |")
        print(f"scores agree: min Spearman per query {rho:.4f}")


if __name__ == "__main__":
    main()
