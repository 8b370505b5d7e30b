"""Evaluating an SAE: reconstruction quality, sparsity, and the LM loss with the SAE spliced in.

    metrics = evaluate(model, params, sae, sae_params, batches, site="blocks_1/resid_post")
    write(metrics, workdir)  # <workdir>/sae_eval.json, plus metrics.jsonl and TensorBoard

Everything is accumulated as sums over tokens (and merged exactly across batches), so the
metrics of many batches equal those of their concatenation, never an average of averages.

Reconstruction (codes c = encode(x), x_hat = decode(c), over the rows of x [N, D]):
  fvu            sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over all rows seen)
  mse            sum ||x - x_hat||^2 / (N * D)
  l0             mean number of nonzero codes per row
  dead_fraction  latents that fired on none of the rows
  dense_fraction latents that fired on more than `dense_threshold` of the rows
Language-model loss (next-token cross-entropy, nats, over the predicted positions of
`interp.models.losses.next_token_loss`):
  clean_loss, spliced_loss (site replaced by the SAE's reconstruction), zero_ablation_loss
  (site replaced by zeros), kl = mean KL(clean || spliced) over the same positions, and
  loss_recovered = (zero - spliced) / (zero - clean).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from interp import metrics as metrics_lib
from interp import paths
from interp.data import activations
from interp.models import hooks, sites
from interp.models.losses import next_token_loss

DENSE_THRESHOLD = 0.1
RESULTS_FILE = "sae_eval.json"


# --- Reconstruction -------------------------------------------------------------------------


def _reconstruction_sums(sae: nn.Module, params, x, mask, target=None):
    """Per-batch sums (float32, on device). x: [..., D]; mask: [...] or None; target: what
    the output is scored against ([..., d_out], a transcoder's output site; default x)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [N, D]
    weight = (
        jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    )
    codes = sae.apply({"params": params}, x, method="encode")  # [N, X]
    x_hat = sae.apply({"params": params}, codes, x, method="decode")
    if target is not None:
        x = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
    tokens = weight.sum()
    mean = (weight[:, None] * x).sum(0) / jnp.maximum(tokens, 1.0)
    active = (codes != 0).astype(jnp.float32)
    return {
        "tokens": tokens,
        "mean": mean,  # [D]
        "m2": (weight * jnp.square(x - mean).sum(-1)).sum(),  # Sum of squares about the mean.
        "sse": (weight * jnp.square(x - x_hat).sum(-1)).sum(),
        "l0": (weight * active.sum(-1)).sum(),
        "fires": (weight[:, None] * active).sum(0),  # [X] rows each latent fired on.
    }


_jit_reconstruction_sums = jax.jit(_reconstruction_sums, static_argnums=0)


class ReconstructionAccumulator:
    """Sums of reconstruction statistics over batches; `result()` gives the metrics.

    Batches are merged on the host in float64; the variance about the overall mean uses the
    pairwise update of Chan et al. (1979), so no sum of squares is differenced.
    """

    def __init__(self, dense_threshold: float = DENSE_THRESHOLD):
        self.dense_threshold = dense_threshold
        self.tokens = 0.0
        self.mean: np.ndarray | None = None
        self.m2 = 0.0
        self.sse = 0.0
        self.l0 = 0.0
        self.fires: np.ndarray | None = None

    def update(
        self, sae: nn.Module, params, x, mask=None, target=None
    ) -> ReconstructionAccumulator:
        """Adds a batch of activations x [..., D] (rows where mask [...] is 0 are skipped);
        a transcoder's output is scored against `target` [..., d_out]."""
        return self.add(_jit_reconstruction_sums(sae, params, x, mask, target))

    def add(self, sums: Mapping[str, Any]) -> ReconstructionAccumulator:
        """Adds the per-batch sums of `_reconstruction_sums`."""
        sums = {k: np.asarray(v, np.float64) for k, v in jax.device_get(dict(sums)).items()}
        tokens = float(sums["tokens"])
        if self.fires is None:
            self.mean, self.fires = np.zeros_like(sums["mean"]), np.zeros_like(sums["fires"])
        if tokens > 0:
            total = self.tokens + tokens
            delta = sums["mean"] - self.mean
            self.m2 += float(sums["m2"]) + float(delta @ delta) * self.tokens * tokens / total
            self.mean = self.mean + delta * tokens / total
            self.tokens = total
        self.sse += float(sums["sse"])
        self.l0 += float(sums["l0"])
        self.fires = self.fires + sums["fires"]
        return self

    def result(self) -> dict[str, float]:
        """fvu, explained_variance, mse, l0, dead_fraction, dense_fraction, num_tokens."""
        if self.fires is None or self.tokens == 0:
            raise ValueError("No activations were added to the accumulator.")
        fvu = self.sse / self.m2 if self.m2 > 0 else float("nan")
        rate = self.fires / self.tokens
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (self.tokens * self.mean.size),
            "l0": self.l0 / self.tokens,
            "dead_fraction": float(np.mean(self.fires == 0)),
            "dense_fraction": float(np.mean(rate > self.dense_threshold)),
            "num_tokens": int(round(self.tokens)),
        }


def reconstruction_metrics(
    sae: nn.Module, params, x, mask=None, dense_threshold: float = DENSE_THRESHOLD
) -> dict[str, float]:
    """Reconstruction and sparsity metrics of one batch of activations.

    Args:
      sae: An `interp.sae.modules.SAE`.
      params: Its 'params'.
      x: Raw activations [..., D].
      mask: Optional [...]; rows where it is 0 are left out.
      dense_threshold: A latent firing on more than this fraction of rows is dense.

    Returns:
      {'fvu', 'explained_variance', 'mse', 'l0', 'dead_fraction', 'dense_fraction',
      'num_tokens'}; use `ReconstructionAccumulator` for many batches.
    """
    return ReconstructionAccumulator(dense_threshold).update(sae, params, x, mask).result()


# --- Loss with the SAE spliced in -----------------------------------------------------------


def _kl_sum(clean_logits, spliced_logits, weight):
    """Sum over weighted positions of KL(clean || spliced). logits: [B, T, V]; weight [B, T]."""
    logp = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
    logq = jax.nn.log_softmax(spliced_logits.astype(jnp.float32))
    kl = (jnp.exp(logp) * (logp - logq)).sum(-1)
    return (kl * weight).sum()


def _loss_sums(model, sae, site, params, sae_params, tokens, attention_mask, keep):
    """Per-batch sums for the loss metrics, and the SAE's input and target rows [B, T, D].

    `site` is a `Site`; the SAE replaces the target site's rows where `keep` [B, T] is set,
    and zero ablation zeroes the same rows.
    """

    def replaced(fn):
        def on_rows(rows):
            return jnp.where(keep[..., None], fn(rows), rows)

        return sites.row_intervention(site.output, on_rows, site.output_head_index)

    def run(interventions, capture=()):
        return hooks.run_with_hooks(
            model,
            params,
            tokens,
            capture=capture,
            interventions=interventions,
            attention_mask=attention_mask,
        )

    clean, captured = run(None, sorted({site.input, site.output}))
    inputs = sites.to_rows(site.input, captured[site.input], site.head_index)
    targets = sites.to_rows(site.output, captured[site.output], site.output_head_index)
    if site.input == site.output:
        splice = replaced(lambda rows: sae.apply({"params": sae_params}, rows)[0])
        spliced, _ = run({site.output: splice})
    else:
        # A transcoder: its input site comes earlier in the same forward pass, so its rows
        # are read there and its output written at the output site.
        seen = {}

        def read(value):
            seen["rows"] = sites.to_rows(site.input, value, site.head_index)
            return value

        def write(rows):
            return sae.apply({"params": sae_params}, seen["rows"])[0]

        spliced, _ = run({site.input: read, site.output: replaced(write)})
    zero, _ = run({site.output: replaced(jnp.zeros_like)})
    sums = {}
    for name, logits in (("clean", clean), ("spliced", spliced), ("zero", zero)):
        loss, count = next_token_loss(logits, tokens, attention_mask)
        sums[name] = loss * count
    # The positions next_token_loss scores: a prediction of a real token from a real token.
    weight = jnp.ones(tokens.shape, jnp.float32) if attention_mask is None else attention_mask
    weight = (weight[:, 1:] * weight[:, :-1]).astype(jnp.float32)
    sums["predictions"] = weight.sum()
    sums["kl"] = _kl_sum(clean[:, :-1], spliced[:, :-1], weight)
    return sums, inputs, targets


def _batch_sums(model, sae, site, params, sae_params, tokens, attention_mask, keep):
    sums, inputs, targets = _loss_sums(
        model, sae, site, params, sae_params, tokens, attention_mask, keep
    )
    return sums, _reconstruction_sums(sae, sae_params, inputs, keep, targets)


_jit_loss_sums = jax.jit(_loss_sums, static_argnums=(0, 1, 2))
_jit_batch_sums = jax.jit(_batch_sums, static_argnums=(0, 1, 2))


class LossAccumulator:
    """Token-weighted sums of the clean, spliced and zero-ablated losses and of the KL."""

    def __init__(self):
        self.sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "predictions": 0.0}

    def add(self, sums: Mapping[str, Any]) -> LossAccumulator:
        for name, value in jax.device_get(dict(sums)).items():
            self.sums[name] += float(value)
        return self

    def result(self) -> dict[str, float]:
        """clean_loss, spliced_loss, zero_ablation_loss, kl, loss_recovered, num_predictions."""
        count = self.sums["predictions"]
        if count == 0:
            raise ValueError("No predicted tokens were added to the accumulator.")
        clean, spliced, zero = (self.sums[k] / count for k in ("clean", "spliced", "zero"))
        gap = zero - clean
        return {
            "clean_loss": clean,
            "spliced_loss": spliced,
            "zero_ablation_loss": zero,
            "kl": self.sums["kl"] / count,
            "loss_recovered": (zero - spliced) / gap if gap != 0 else float("nan"),
            "num_predictions": int(round(count)),
        }


# The site an SAE reads and writes: one definition in the data layer (analysis and steering
# use it too).
Site = activations.SaeSite
resolve_site = activations.resolve_sae_site


def _keep(tokens, mask, exclusions) -> jax.Array:
    keep = activations.keep_mask(tokens, mask, **exclusions)
    return jnp.asarray(keep)


def spliced_loss(
    model: nn.Module,
    params,
    sae: nn.Module,
    sae_params,
    tokens,
    site: str | None = None,
    attention_mask=None,
    *,
    head_index: int | None = None,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    allow_other_site: bool = False,
) -> dict[str, float]:
    """Next-token loss with the SAE's reconstruction in place of the activations at `site`.

    Args:
      model: A `Transformer`.
      params: Its parameters.
      sae: An `interp.sae.modules.SAE` trained on the activations at `site` (a transcoder:
        its output replaces its config's `output_hook_name`).
      sae_params: Its 'params'.
      tokens: [B, T] int token ids.
      site: One hook name, e.g. 'blocks_1/resid_post' or 'blocks.1.hook_resid_post'; default
        the SAE config's `hook_name`.
      attention_mask: Optional [B, T], 1 for real tokens.
      head_index: For a per-head SAE, its head (default the config's `hook_head_index`).
      bos_id, skip_first, exclude_ids: Positions the SAE does not see (see `evaluate`).
      allow_other_site: Accept a `site` other than the SAE config's (see `resolve_site`).

    Returns:
      {'clean_loss', 'spliced_loss', 'zero_ablation_loss', 'kl', 'loss_recovered',
      'num_predictions'}: losses in nats per predicted token, kl = mean KL(clean || spliced)
      over the same positions, loss_recovered = (zero - spliced) / (zero - clean).

    Raises:
      ValueError: see `resolve_site`; for tokens longer than the model's max_len.
    """
    resolved = resolve_site(model, sae, site, head_index, allow_other_site=allow_other_site)
    model.config.check_length(np.shape(tokens)[-1], "spliced_loss's tokens")
    exclusions = dict(bos_id=bos_id, skip_first=skip_first, exclude_ids=tuple(exclude_ids))
    keep = _keep(tokens, attention_mask, exclusions)
    sums, _, _ = _jit_loss_sums(
        model, sae, resolved, params, sae_params, tokens, attention_mask, keep
    )
    return LossAccumulator().add(sums).result()


def evaluate(
    model: nn.Module,
    params,
    sae: nn.Module,
    sae_params,
    batches: Iterable[Any],
    site: str | None = None,
    *,
    head_index: int | None = None,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    dense_threshold: float = DENSE_THRESHOLD,
    max_batches: int | None = None,
    allow_other_site: bool = False,
) -> dict[str, float]:
    """Reconstruction, sparsity and spliced-loss metrics of an SAE over token batches.

    Rows are the site's per-token rows (`interp.models.sites.to_rows`), the layout `harvest`
    gives and SAEs are trained on, so head-shaped sites and per-head SAEs evaluate as
    trained. A transcoder is scored against its output site's rows and spliced in there.

    Args:
      model: A `Transformer`; params: its parameters.
      sae: The SAE for the activations at `site`; sae_params: its 'params'.
      batches: Token batches: [B, T] int arrays, (tokens, attention_mask) tuples, or dicts with
        'tokens' and optionally 'attention_mask'. Padded positions are left out everywhere.
      site: One hook name (ours or TransformerLens's); default the SAE config's `hook_name`.
      head_index: For a per-head SAE, its head (default the config's `hook_head_index`).
      bos_id, skip_first, exclude_ids: Positions the SAE does not see, as for
        `interp.data.activations.harvest` (one definition: `activations.keep_mask`); pass
        the values the SAE was trained with. There (and at padding) the clean activations
        stay in place when splicing and zero-ablating, and no reconstruction is scored; the
        loss is still over every predicted token.
      dense_threshold: A latent firing on more than this fraction of tokens is dense.
      max_batches: Stop after this many batches.
      allow_other_site: Accept a `site` other than the SAE config's (see `resolve_site`).

    Returns:
      The keys of `ReconstructionAccumulator.result` and `LossAccumulator.result`, with
      'num_batches'.

    Raises:
      ValueError: see `resolve_site`; with no batches, or batches longer than the model's
        max_len.
    """
    resolved = resolve_site(model, sae, site, head_index, allow_other_site=allow_other_site)
    exclusions = dict(bos_id=bos_id, skip_first=skip_first, exclude_ids=tuple(exclude_ids))
    reconstruction, losses = ReconstructionAccumulator(dense_threshold), LossAccumulator()
    num_batches = 0
    for batch in batches:
        if max_batches is not None and num_batches >= max_batches:
            break
        tokens, mask = activations.split_batch(batch)
        model.config.check_length(tokens.shape[1], "evaluate's batches")
        keep = _keep(tokens, mask, exclusions)
        loss_sums, recon_sums = _jit_batch_sums(
            model, sae, resolved, params, sae_params, tokens, mask, keep
        )
        losses.add(loss_sums)
        reconstruction.add(recon_sums)
        num_batches += 1
    if not num_batches:
        raise ValueError("evaluate got no batches.")
    return {**reconstruction.result(), **losses.result(), "num_batches": num_batches}


def _scalar(value) -> int | float:
    array = np.asarray(value)
    return int(array) if array.dtype.kind in "iub" else float(array)


def write(
    metrics: Mapping[str, Any],
    workdir: epath.PathLike,
    *,
    step: int = 0,
    name: str = RESULTS_FILE,
    prefix: str = "sae_eval/",
) -> epath.Path:
    """Writes evaluation metrics to `<workdir>/<name>` (JSON) and as scalars at `step`.

    The scalars go through `interp.metrics.MetricWriter` (metrics.jsonl and TensorBoard under
    the workdir), named `prefix + key`.

    Returns:
      The JSON file's path.
    """
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    values = {k: _scalar(v) for k, v in metrics.items()}
    path = workdir / name
    paths.write_text(
        path, json.dumps({"step": int(step), **values}, indent=2, sort_keys=True) + "\n"
    )
    writer = metrics_lib.MetricWriter(workdir)
    try:
        writer.write(step, {prefix + k: v for k, v in values.items()})
    finally:
        writer.close()
    return path
