"""Logit effects: the tokens each SAE feature's decoder direction most raises and lowers.

Legend: X latents, D model width, V vocabulary, k tokens shown.

A feature that writes direction d (its decoder row W_dec[f], divided by the SAE's input
scale, as `decode` applies it) into the residual stream moves the logits, through the direct
path, by

    effect = norm_f(d) @ W_U                         # [V]

where norm_f is the final norm's *linear part* as the model applies it:
  * LayerNorm subtracts the mean over D (linear, so d - mean(d) is kept) and RMSNorm does not;
  * the division by the token's RMS is left out: it is one positive number per token that
    depends on the whole residual stream, not on d, so it rescales a feature's effects on
    every token alike and leaves their order unchanged (effects are per unit of RMS);
  * the learned scale multiplies d elementwise (Gemma's 1 + w: `norm_offset + scale`); the
    norm's bias does not depend on d and is left out.
W_U is the unembedding (the transposed token embedding when tied, else `lm_head`); the final
soft-cap (Gemma 2) is monotone and left out. This is SAELens's / Neuronpedia's W_dec @ W_U
after TransformerLens folds the norm's weights into W_U (and, for LayerNorm, centres the
directions).

Sites past the norm: at `final_norm` (what the unembedding reads) d goes straight to W_U; at
`ln_f/normalized` (before the learned scale) only the scale applies. Other sites must be
residual-stream wide (resid_*, attn_out, mlp/out); sites of another width (attn/z, MLP
hidden units) are refused, since their direct effect passes through more weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interp.analysis.features import check_features
from interp.data import activations
from interp.models import hooks

_CHUNK = 256  # Features per matmul with W_U (on device): [256, V] float32 is 256 MB at V = 256k.


@dataclasses.dataclass(frozen=True)
class LogitEffects:
    """Per feature, best first.

    Attributes:
      features: [n] the features.
      top_tokens, top_values: [n, k] the tokens most raised, with their logit change.
      bottom_tokens, bottom_values: [n, k] the tokens most lowered (most negative first).
    """

    features: np.ndarray
    top_tokens: np.ndarray
    top_values: np.ndarray
    bottom_tokens: np.ndarray
    bottom_values: np.ndarray


def _unembedding(config, params) -> jax.Array:
    """W_U [D, V] in float32."""
    if config.tied_embeddings:
        return jnp.asarray(params["embed"], jnp.float32).T
    return jnp.asarray(params["lm_head"], jnp.float32)


def _norm_part(config, params, site: str | None) -> tuple[bool, jax.Array | None]:
    """(centre the directions?, the scale they are multiplied by, or None) at `site`."""
    if site == "final_norm":
        return False, None
    centre = site != "ln_f/normalized" and config.norm == "layernorm"
    return centre, config.norm_offset + jnp.asarray(params["ln_f"]["scale"], jnp.float32)


def _effects(directions, scale, unembed, centre: bool):
    """[n, V] float32; the matmul at full precision (TPUs default to bfloat16 passes)."""
    d = directions.astype(jnp.float32)
    if centre:
        d = d - d.mean(-1, keepdims=True)
    if scale is not None:
        d = d * scale
    return jnp.dot(d, unembed, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _extremes(directions, scale, unembed, centre: bool, k: int):
    """The k largest and k smallest effects per direction (ties: lower token id first)."""
    effects = _effects(directions, scale, unembed, centre)
    top_values, top = jax.lax.top_k(effects, k)
    bottom_values, bottom = jax.lax.top_k(-effects, k)
    return top, top_values, bottom, -bottom_values


def directions_to_logits(config: Any, params, directions, site: str | None = None) -> np.ndarray:
    """[n, V] logit effects of residual-stream directions [n, D] (see the module docstring).

    Args:
      config: The model's `ModelConfig`.
      params: Its parameters.
      directions: [n, D] vectors written at `site`.
      site: A resolved hook name; None means the residual stream.
    """
    centre, scale = _norm_part(config, params, site)
    unembed = _unembedding(config, params)
    return np.asarray(_effects(jnp.asarray(directions), scale, unembed, centre))


def _residual_site(site: str | None) -> bool:
    if site is None or site in ("final_norm", "ln_f/normalized"):
        return True
    tail = site.split("/", 1)[-1]
    return tail in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp/out")


def _written_site(model, sae, site):
    """The resolved site the SAE writes (a transcoder: its output site), or None."""
    if sae is not None:
        site = site or sae.config.output_hook_name or sae.config.hook_name
    return None if site is None else hooks.resolve(model, [site])[0]


def why_no_direct_effect(model: nn.Module, sae_params, *, sae=None, site=None) -> str | None:
    """Why an SAE's decoder has no logit effects here (a sentence), or None when it has.

    Its directions must be written to the residual stream (or past the final norm) and be
    `d_model` wide; see `logit_effects` for the arguments.
    """
    site = _written_site(model, sae, site)
    width = np.shape(sae_params["W_dec"])[1]
    if not _residual_site(site):
        return (
            f"Logit effects read the residual stream; site {site!r} reaches the logits "
            "through other weights first (attention's output projection, the MLP's down "
            "projection). Use an SAE at resid_*, attn_out or mlp/out."
        )
    if width != model.config.d_model:
        return (
            f"This SAE's decoder writes {width}-wide vectors but the model's residual "
            f"stream is {model.config.d_model} wide; logit effects need a residual-stream SAE."
        )
    return None


def logit_effects(
    model: nn.Module,
    params,
    sae_params,
    features=None,
    k: int = 10,
    *,
    sae: nn.Module | None = None,
    site: str | None = None,
    allow_other_site: bool = False,
) -> LogitEffects:
    """The k tokens each feature's decoder direction most raises and most lowers.

    Args:
      model: A `Transformer` (its config gives the final norm and unembedding).
      params: Its parameters.
      sae_params: The SAE's 'params' (W_dec [X, D]).
      features: Feature indices (default all).
      k: Tokens per side.
      sae: The SAE module, optional: its config's input_scale scales the directions as
        `decode` does, and the site it writes (hook_name, a transcoder's output_hook_name)
        is the default `site`. (An SAE that normalises each token rescales its output by a
        per-token positive factor, which leaves the order of effects unchanged.)
      site: The hook site the SAE writes (ours or TransformerLens's); None: the residual
        stream. With `sae`, another site than the one it writes is refused unless
        `allow_other_site` (`interp.data.activations.check_sae_site`).
      allow_other_site: Accept that.

    Returns:
      `LogitEffects`.

    Raises:
      ValueError: for a feature outside the SAE, a decoder not as wide as the residual
        stream, a site whose direct effect on the logits is not the final norm and W_U, or
        a site other than the SAE's (see `allow_other_site`).
    """
    config = model.config
    w_dec = np.asarray(sae_params["W_dec"], np.float32)
    num_latents = w_dec.shape[0]
    features = np.arange(num_latents) if features is None else features
    features = check_features(np.atleast_1d(features), num_latents)
    if not features.size:
        raise ValueError("logit_effects got no features.")
    scale = 1.0 if sae is None else float(sae.config.input_scale)
    if sae is not None:
        activations.check_sae_site(
            sae, site, model=model, allow_other_site=allow_other_site, end="output"
        )
    why = why_no_direct_effect(model, sae_params, sae=sae, site=site)
    if why:
        raise ValueError(why)
    site = _written_site(model, sae, site)
    k = min(k, config.vocab_size)
    centre, norm_scale = _norm_part(config, params, site)
    unembed = _unembedding(config, params)
    parts = []
    for start in range(0, len(features), _CHUNK):  # [chunk, V] at a time, not [X, V].
        chunk = w_dec[features[start : start + _CHUNK]] / scale
        if len(chunk) < _CHUNK and len(features) > _CHUNK:  # One compiled shape.
            chunk = np.pad(chunk, ((0, _CHUNK - len(chunk)), (0, 0)))
        found = _extremes(jnp.asarray(chunk), norm_scale, unembed, centre, k)
        parts.append([np.asarray(a)[: len(features) - start] for a in found])
    top, top_values, bottom, bottom_values = (np.concatenate(p) for p in zip(*parts, strict=True))
    return LogitEffects(features, top, top_values, bottom, bottom_values)
