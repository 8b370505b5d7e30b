"""What a query measures: differentiable scalars of the model's output or of hook values.

The influence of a training sequence is how much up-weighting it would raise a query's
measurement (kronfluence's `compute_measurement`). The default is the log-probability of the
query's completion (its tokens with loss_mask 1); also built in:

    logit_margin(token_a, token_b)          logit[a] - logit[b] at each row's last scored position
    sae_feature(sae, sae_params, hook, feature)   the feature's activation summed over the
                                            positions the query's loss_mask marks

and any `Measurement(fn, hooks)` with fn(logits [B, T, V], batch, {hook: value}) -> [B].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from interp.data import activations
from interp.influence import gradients
from interp.models import sites

MeasurementFn = gradients.MeasurementFn


@dataclasses.dataclass(frozen=True, eq=False)
class Measurement:
    """A query's measurement. Hashable by identity (jit compiles once per measurement).

    Attributes:
      fn: (logits [B, T, V], batch {'tokens', 'loss_mask', 'attention_mask'}, {hook: value})
        -> [B], one scalar per query sequence; the values are keyed by the names in `hooks`
        as given (ours or TransformerLens's), each resolved to one site of the model.
      hooks: Hook sites whose values `fn` reads.
      name: For reports.
    """

    fn: MeasurementFn
    hooks: tuple[str, ...] = ()
    name: str = "measurement"


def log_prob() -> Measurement:
    """log p(completion | prompt): minus the summed NLL of the tokens loss_mask marks."""

    def fn(logits, batch, values):
        del values
        return -gradients.sequence_nll(logits, batch["tokens"], batch["loss_mask"])

    return Measurement(fn, name="log_prob")


def _last_scored(loss_mask: jax.Array) -> jax.Array:
    """[B]: the last position whose token loss_mask scores."""
    positions = jnp.arange(loss_mask.shape[1])
    return jnp.max(jnp.where(loss_mask > 0, positions, -1), axis=1)


def logit_margin(token_a: int, token_b: int) -> Measurement:
    """logit[token_a] - logit[token_b] predicting each row's last scored position."""

    def fn(logits, batch, values):
        del values
        position = _last_scored(batch["loss_mask"]) - 1  # The logits that predict it.
        row = jnp.take_along_axis(logits, position[:, None, None], axis=1)[:, 0]
        row = row.astype(jnp.float32)
        return row[:, token_a] - row[:, token_b]

    return Measurement(fn, name=f"logit_margin({token_a},{token_b})")


def sae_feature(
    sae: Any,
    sae_params: Any,
    hook: str | None = None,
    feature: int = 0,
    *,
    head_index: int | None = None,
    allow_other_site: bool = False,
) -> Measurement:
    """An SAE feature's activation at `hook`, summed over the positions loss_mask marks.

    The SAE reads the site's per-token rows (`interp.models.sites.to_rows`), the layout it
    was harvested and trained in, so head-shaped sites and per-head SAEs work as in
    evaluation.

    Args:
      sae: The SAE module (`interp.sae.load(path)[0]`); used as a plain function of the
        hook's rows, so this room needs nothing from `interp.sae`.
      sae_params: Its parameters.
      hook: The site the SAE reads ('blocks_2/resid_post', or TransformerLens's name);
        default the SAE config's `hook_name`.
      feature: The latent's index.
      head_index: For a per-head SAE, its head; default the config's `hook_head_index`.
      allow_other_site: Accept a `hook` other than the SAE config's `hook_name`
        (`interp.data.activations.check_sae_site`, the check steering and analysis make).

    Raises:
      ValueError: when neither `hook` nor the SAE's config names a site, `hook` is a
        pattern or another site than the SAE's own (see `allow_other_site`), or `feature`
        is not one of the SAE's latents. A name that matches no site of the model is
        refused when scoring.
    """
    config = getattr(sae, "config", None)
    hook = hook or getattr(config, "hook_name", None)
    if hook is None:
        raise ValueError(
            "sae_feature needs the SAE's site: pass hook=, e.g. 'blocks_2/resid_post'."
        )
    if any(c in hook for c in "*?["):
        raise ValueError(f"sae_feature reads one site; {hook!r} is a pattern.")
    activations.check_sae_site(sae, hook, allow_other_site=allow_other_site)
    layout = hook  # Only whether it holds patterns matters here; the model resolves the name.
    if sites.is_transformer_lens_name(hook) and not sites.depends_on_model(hook):
        layout = sites.from_transformer_lens(hook)  # Unknown TransformerLens names fail here.
    num_latents = getattr(config, "num_latents", None)
    if num_latents is not None and not 0 <= feature < num_latents:
        raise ValueError(f"feature {feature} is outside 0..{num_latents - 1}, this SAE's latents.")
    if head_index is None:
        head_index = getattr(config, "hook_head_index", None)

    def fn(logits, batch, values):
        del logits
        rows = sites.to_rows(layout, values[hook], head_index)  # [B, T, D]
        codes = sae.apply({"params": sae_params}, rows, method="encode")  # [B, T, X]
        return (codes[..., feature].astype(jnp.float32) * batch["loss_mask"]).sum(axis=1)

    return Measurement(fn, hooks=(hook,), name=f"{hook}[{feature}]")
