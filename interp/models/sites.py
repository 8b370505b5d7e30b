"""What a hook site holds, per token: one layout for harvest, SAEs, splicing and steering.

Legend: B batch, T positions, S key positions, N heads, H head dim, D a site's row width.

Every site is read and written per token through the same two functions, so an SAE trained
on harvested rows sees the same vector when it is evaluated, spliced in, steered with or used
as an influence query:

    rows = sites.to_rows(name, value)                    # [B, T, D]
    value = sites.from_rows(name, value, rows)           # the site's own shape again
    fn = sites.row_intervention(name, sae_reconstruct)   # an intervention for run_with_hooks

Layouts:
  [B, T, D] sites (resid_*, attn_out, mlp/*, final_norm, .../normalized): rows are the value.
  Head-shaped sites [B, T, N, H] (attn/q, attn/k [B, T, K, H], attn/v, attn/z): rows are the
    heads concatenated, [B, T, N * H] (SAELens's hook_z layout; `harvest` gives these); with
    `head_index` one head's [B, T, H] (SAELens's hook_head_index; columns
    head_index * H ... of the harvested rows), and writing rows back replaces that head only.
  attn/pattern [B, N, T, S]: rows are each query position's attention over keys, [B, T, N * S]
    (with `head_index`, [B, T, S]); the width depends on the sequence length S.

TransformerLens names (`blocks.5.hook_resid_post`, `blocks.5.attn.hook_z`, ...) are accepted
wherever interp takes a hook name (`hooks.resolve` translates them with `from_transformer_lens`)
and `to_transformer_lens` gives the reverse for export.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# TransformerLens name (after 'blocks.{L}.') -> interp name (after 'blocks_{L}/').
_TL_BLOCK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp/out",
    "hook_mlp_in": "resid_mid",  # The MLP's input before its norm: resid_pre when parallel.
    "attn.hook_rot_q": "attn/q",
    "attn.hook_rot_k": "attn/k",
    "attn.hook_q": "attn/q",  # Equal only without rotary embeddings (see `_ROTARY_ONLY`).
    "attn.hook_k": "attn/k",
    "attn.hook_v": "attn/v",
    "attn.hook_z": "attn/z",
    "attn.hook_pattern": "attn/pattern",
    "mlp.hook_pre": "mlp/pre_act",
    "mlp.hook_pre_linear": "mlp/up",
    "mlp.hook_post": "mlp/post_act",
    "ln1.hook_normalized": "ln_1/normalized",
    "ln2.hook_normalized": "ln_2/normalized",
    "ln1_post.hook_normalized": "post_attn_norm/normalized",
    "ln2_post.hook_normalized": "post_mlp_norm/normalized",
}
_TL_TOP = {"ln_final.hook_normalized": "ln_f/normalized", "unembed.hook_in": "final_norm"}
# TransformerLens's hook_q / hook_k are before the rotary embedding; interp's attn/q and
# attn/k after it (TransformerLens's hook_rot_q / hook_rot_k).
_ROTARY_ONLY = ("attn.hook_q", "attn.hook_k")
_OURS_BLOCK = {
    ours: tl for tl, ours in _TL_BLOCK.items() if tl not in _ROTARY_ONLY + ("hook_mlp_in",)
}
_OURS_TOP = {ours: tl for tl, ours in _TL_TOP.items()}
_TL_PATTERN = re.compile(r"blocks\.(\d+|\*)\.(.+)")  # A layer number, or * for all.
_OURS_PATTERN = re.compile(r"blocks_(\d+)/(.+)")


class UnknownTransformerLensName(ValueError):
    """A TransformerLens hook name with no equal interp site."""


def is_transformer_lens_name(name: str) -> bool:
    """Whether `name` is spelled as TransformerLens spells hook names (dots, `hook_`)."""
    return "hook_" in name and "/" not in name


def depends_on_model(name: str) -> bool:
    """Whether a TransformerLens name's site here depends on the model (rotary or not,
    parallel residual or not): hook_q, hook_k, hook_mlp_in. Keep such names as written until
    a model is at hand (`hooks.resolve` translates them with its config)."""
    match = _TL_PATTERN.fullmatch(name)
    return bool(match) and match.group(2) in _ROTARY_ONLY + ("hook_mlp_in",)


def from_transformer_lens(name: str, config: Any = None) -> str:
    """interp's name for a TransformerLens hook name; names already ours pass through.

    Args:
      name: e.g. 'blocks.5.hook_resid_post', 'blocks.5.attn.hook_z',
        'ln_final.hook_normalized'.
      config: The model's `ModelConfig`, when known: `attn.hook_q` / `attn.hook_k` of a
        rotary model are refused (they are taken before the rotation; interp's attn/q is
        after it, TransformerLens's `attn.hook_rot_q`).

    Raises:
      UnknownTransformerLensName: for a TransformerLens name with no equal site here,
        listing the names that have one.
    """
    if not is_transformer_lens_name(name):
        return name
    if name in _TL_TOP:
        return _TL_TOP[name]
    match = _TL_PATTERN.fullmatch(name)
    if match and match.group(2) in _TL_BLOCK:
        site = match.group(2)
        if site in _ROTARY_ONLY and getattr(config, "positions", None) == "rotary":
            raise UnknownTransformerLensName(
                f"TransformerLens's {name!r} is taken before the rotary embedding, which "
                f"interp has no site for; interp's blocks_{match.group(1)}/attn/{site[-1]} is "
                f"after it (TransformerLens's blocks.{match.group(1)}.attn.hook_rot_{site[-1]})."
            )
        ours = _TL_BLOCK[site]
        if site == "hook_mlp_in" and getattr(config, "parallel_residual", False):
            ours = "resid_pre"
        return f"blocks_{match.group(1)}/{ours}"
    known = sorted(f"blocks.{{L}}.{k}" for k in _TL_BLOCK) + sorted(_TL_TOP)
    layer = match.group(1) if match else "0"
    spelled = [k.replace("{L}", layer) for k in known]
    close = difflib.get_close_matches(name, spelled, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise UnknownTransformerLensName(
        f"TransformerLens hook name {name!r} has no equal site in interp (hook_embed, "
        f"hook_pos_embed, hook_attn_in, hook_scale and the like are not kept).{hint} "
        f"The TransformerLens names accepted are: {', '.join(known)}."
    )


def to_transformer_lens(name: str, config: Any = None) -> str:
    """The TransformerLens hook name of an interp site (for SAELens exports).

    Args:
      name: An interp hook name such as 'blocks_5/mlp/out'.
      config: The model's `ModelConfig`, when known: attn/q and attn/k of a model without
        rotary embeddings are TransformerLens's hook_q / hook_k, else hook_rot_q / hook_rot_k.

    Raises:
      ValueError: for a site TransformerLens has no hook for (e.g. 'blocks_0/mlp/in').
    """
    if name in _OURS_TOP:
        return _OURS_TOP[name]
    match = _OURS_PATTERN.fullmatch(name)
    if match and match.group(2) in _OURS_BLOCK:
        tl = _OURS_BLOCK[match.group(2)]
        if tl.startswith("attn.hook_rot_") and getattr(config, "positions", "rotary") != "rotary":
            tl = tl.replace("hook_rot_", "hook_")
        return f"blocks.{match.group(1)}.{tl}"
    raise ValueError(
        f"interp site {name!r} has no TransformerLens hook name; those that do: "
        f"blocks_{{L}}/{{{', '.join(sorted(_OURS_BLOCK))}}} and {', '.join(sorted(_OURS_TOP))}."
    )


def _spellings(name: str, config: Any) -> set[str]:
    """interp's names `name` may stand for: one with the model's config (or a name that
    needs no model), both candidates of hook_mlp_in without it."""
    try:
        ours = from_transformer_lens(name, config)
    except UnknownTransformerLensName:
        return {name}
    if config is None and depends_on_model(name) and name.endswith(".hook_mlp_in"):
        return {ours, ours.replace("/resid_mid", "/resid_pre")}  # A parallel residual's.
    return {ours}


def same_site(name: str, other: str, config: Any = None) -> bool:
    """Whether two hook names (ours or TransformerLens's) name the same site.

    Args:
      name, other: e.g. 'blocks_1/resid_post' and 'blocks.1.hook_resid_post' (the same).
      config: The model's `ModelConfig`, when known; without it a TransformerLens name whose
        site depends on the model (hook_mlp_in: resid_pre under a parallel residual) counts
        as the same as either of its sites.
    """
    return bool(_spellings(name, config) & _spellings(other, config))


# ----------------------------------------------------------------------------- layouts


def is_pattern(name: str) -> bool:
    """Whether a site holds attention patterns [B, N, T, S] (heads before positions)."""
    return name == "attn/pattern" or name.endswith("/attn/pattern")


def _per_token(name: str, value):
    """The value with positions on axis 1: patterns [B, T, N, S], others unchanged."""
    return jnp.moveaxis(value, 1, 2) if is_pattern(name) else value


def _check_head(name: str, value, head_index: int | None) -> None:
    if head_index is None:
        return
    if value.ndim != 4:
        raise ValueError(
            f"head_index={head_index} given for site {name!r} of shape {tuple(value.shape)}, "
            "which has no heads axis; a head index applies to attn/q, attn/k, attn/v, attn/z "
            "and attn/pattern."
        )
    heads = value.shape[2]
    if not 0 <= head_index < heads:
        raise ValueError(f"head_index={head_index} outside 0..{heads - 1} at site {name!r}.")


def to_rows(name: str, value, head_index: int | None = None):
    """A site's value as per-token rows [B, T, D] (see the module docstring for D).

    Raises:
      ValueError: for a value with fewer than three axes, or a `head_index` the site has no
        head for.
    """
    if value.ndim < 3:
        raise ValueError(
            f"Site {name!r} has shape {tuple(value.shape)}, not [B, T, ...]; it has no rows "
            "per token."
        )
    value = _per_token(name, value)
    _check_head(name, value, head_index)
    if head_index is not None:
        return value[:, :, head_index]
    return value.reshape(*value.shape[:2], -1)


def from_rows(name: str, value, rows, head_index: int | None = None):
    """`value` (the site's own shape) with its rows replaced by `rows` [B, T, D].

    With `head_index`, only that head changes.

    Raises:
      ValueError: when `rows` is not the shape `to_rows` gives for this value.
    """
    per_token = _per_token(name, value)
    _check_head(name, per_token, head_index)
    want = to_rows(name, value, head_index).shape
    if tuple(rows.shape) != tuple(want):
        raise ValueError(
            f"Rows of shape {tuple(rows.shape)} for site {name!r}, which gives rows of shape "
            f"{tuple(want)} (head_index={head_index})."
        )
    rows = jnp.asarray(rows).astype(value.dtype)
    if head_index is not None:
        new = jnp.asarray(per_token).at[:, :, head_index].set(rows)
    else:
        new = rows.reshape(per_token.shape)
    return jnp.moveaxis(new, 2, 1) if is_pattern(name) else new


def row_intervention(
    name: str, fn: Callable[[Any], Any], head_index: int | None = None
) -> Callable[[Any], Any]:
    """An intervention for `hooks.run_with_hooks` that applies `fn` to the site's rows.

    `fn` maps rows [B, T, D] to rows of the same shape (an SAE's reconstruction, a steering
    vector added, zeros); the result is written back in the site's layout.
    """

    def intervene(value):
        return from_rows(name, value, fn(to_rows(name, value, head_index)), head_index)

    return intervene
