"""Rotary settings: Hugging Face config.json <-> the rope fields of `ModelConfig`.

Both layouts: transformers 4 (top-level `rope_theta` / `rope_scaling`, NeoX `rotary_pct` /
`rotary_emb_base`, Gemma 3 `rope_local_base_freq`) and transformers 5 (`rope_parameters`,
nested by layer type for Gemma 3). Rope types default, linear, dynamic, yarn and llama3, with
the keys and defaults of transformers' `modeling_rope_utils`; another type or key is an error
naming it. The maths is in `transformer.rotary_inverse_frequencies`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from interp.models.config import ModelConfig

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Keys each rope type may carry besides rope_type/type/rope_theta/partial_rotary_factor.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _scaling(
    params: Mapping[str, Any], hf: Mapping[str, Any], family: str, max_len: int
) -> dict[str, Any]:
    """The rope_scaling fields of ModelConfig from one rotary's parameters."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope type {kind!r} in {family} rope_parameters/rope_scaling; "
            f"supported: {', '.join(ROPE_TYPES)}."
        )
    common = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    unknown = sorted(set(params) - common - _ROPE_KEYS[kind])
    if unknown:
        raise ValueError(f"Unsupported {kind} rope parameter(s) {unknown} in {family} config.")
    if kind == "default":
        return {}
    # transformers gives a top-level original_max_position_embeddings priority (Phi 3).
    original = hf.get(
        "original_max_position_embeddings", params.get("original_max_position_embeddings")
    )
    original = int(max_len if original is None else original)
    factor = params.get("factor")
    if kind == "yarn" and factor is None:  # transformers: the context extension ratio
        factor = max_len / original
    out: dict[str, Any] = {"rope_scaling": kind, "rope_factor": float(factor)}
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=original,
        )
    elif kind == "yarn":
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:
            # DeepSeek's form of YaRN's attention factor, as transformers computes it.
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        out.update(
            rope_original_max_len=original,
            rope_beta_fast=float(params.get("beta_fast") or 32),
            rope_beta_slow=float(params.get("beta_slow") or 1),
            rope_attention_factor=None if attention_factor is None else float(attention_factor),
            rope_truncate=bool(params.get("truncate", True)),
        )
    return out


def rope_from_hf(
    hf: Mapping[str, Any],
    family: str,
    *,
    max_len: int,
    default_theta: float = 10_000.0,
    local_rope: bool = False,
) -> dict[str, Any]:
    """The rotary fields of `ModelConfig` from a config.json dict, in either layout.

    Args:
      hf: The config.json dict.
      family: Its model_type (for messages; gpt_neox rotates a fraction of each head).
      max_len: Its max_position_embeddings (or the family's default).
      default_theta: The family's rope_theta when the config has none.
      local_rope: The family gives sliding layers their own unscaled rotary (Gemma 3).

    Raises:
      ValueError: naming an unsupported rope type, parameter or layer-type split.
    """
    params = dict(hf.get("rope_parameters") or {})
    nested = {k: v for k, v in params.items() if isinstance(v, Mapping)}  # by layer type
    local = None
    if nested:
        unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"Unsupported rope_parameters keys {unknown} in {family} config.")
        if local_rope:
            params = dict(nested.get("full_attention") or {})
            local = dict(nested.get("sliding_attention") or {})
        else:  # One decoder-wide rotary is all these families have.
            if any(dict(v) != dict(next(iter(nested.values()))) for v in nested.values()):
                raise ValueError(f"Per-layer-type rope_parameters differ: {params}.")
            params = dict(next(iter(nested.values())))
    if hf.get("rope_scaling"):  # transformers 4 layout; wins, as in transformers.
        params = dict(params, **hf["rope_scaling"]) if local_rope else dict(hf["rope_scaling"])
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base")))
    fraction = params.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25 if family == "gpt_neox" else 1)),
    )
    if family != "gpt_neox" and fraction != 1:  # HF's Llama-like models rotate whole heads.
        raise ValueError(f"{family} partial_rotary_factor={fraction} is not supported.")
    out = {
        "rope_theta": float(default_theta if theta is None else theta),
        "rotary_fraction": float(fraction),
        **_scaling(params, hf, family, max_len),
    }
    if local_rope:
        local = local or {}
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default" or set(local) - {"rope_type", "type", "rope_theta"}:
            raise ValueError(
                f"Unsupported {family} rope_parameters['sliding_attention'] {local}: sliding "
                "layers rotate with rope_type 'default' and a rope_theta only."
            )
        out["rope_local_theta"] = float(
            local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        )
    return out


def rope_to_hf(c: ModelConfig) -> dict[str, Any]:
    """transformers 5 `rope_parameters` of the (global) rotary of `c`."""
    rope: dict[str, Any] = {"rope_type": c.rope_scaling or "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope["factor"] = c.rope_factor
    if c.rope_scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = c.rope_original_max_len
    if c.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor
        )
    if c.rope_scaling == "yarn":
        rope.update(
            beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, truncate=c.rope_truncate
        )
        if c.rope_attention_factor is not None:
            rope["attention_factor"] = c.rope_attention_factor
    return rope
