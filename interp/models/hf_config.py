"""Hugging Face config.json <-> `ModelConfig`.

Families: gpt2, gpt_neox (Pythia), llama, gemma2. `config_from_hf` reads both the transformers
4 layout of config.json (top-level `rope_theta`/`rope_scaling`, NeoX `rotary_pct`, Gemma 2
without `layer_types`) and the transformers 5 one (`rope_parameters`); `config_to_hf` writes
both, and refuses a config that the family's HF model cannot express.

Parameters are mapped in `hf_params.py`; folders (safetensors files,
from_pretrained/save_pretrained) are in `pretrained.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from interp.models.config import ModelConfig

SUPPORTED = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "gpt_neox": ("GPTNeoXForCausalLM",),
    "llama": ("LlamaForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
}
_TIED_DEFAULT = {"gpt2": True, "gpt_neox": False, "llama": False, "gemma2": True}
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


def _supported_text() -> str:
    return ", ".join(f"{k} ({', '.join(v)})" for k, v in SUPPORTED.items())


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def _rope(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Rotary fields of ModelConfig from either config layout."""
    # transformers 5: `rope_parameters`; 4: `rope_scaling` (which wins if both, as in HF).
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = [v for v in params.values() if isinstance(v, Mapping)]
    if nested:  # Per layer type; one decoder-wide rotary is all we model.
        if any(dict(v) != dict(nested[0]) for v in nested):
            raise ValueError(f"Per-layer-type rope_parameters differ: {params}.")
        params = dict(nested[0])
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base")))
    fraction = params.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25 if family == "gpt_neox" else 1)),
    )
    if family != "gpt_neox" and fraction != 1:  # HF's Llama/Gemma 2 rotate whole heads.
        raise ValueError(f"{family} partial_rotary_factor={fraction} is not supported.")
    out = {
        "rope_theta": float(10_000.0 if theta is None else theta),
        "rotary_fraction": float(fraction),
    }
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(
                params.get("original_max_position_embeddings", hf["max_position_embeddings"])
            ),
        )
    elif kind != "default":
        raise ValueError(f"Unsupported rope type {kind!r}; supported: default, llama3.")
    return out


def _gemma2_sliding_layers(hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    if hf.get("sliding_window") is None:
        return ()
    if hf.get("layer_types"):
        kinds = list(hf["layer_types"])
        unknown = set(kinds) - {"sliding_attention", "full_attention"}
        if unknown or len(kinds) != num_layers:
            raise ValueError(f"Unsupported gemma2 layer_types {kinds}.")
        return tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    # Older configs: every `pattern`-th layer is global, the others slide (Gemma 2: 2).
    pattern = int(hf.get("sliding_window_pattern", 2))
    return tuple(i for i in range(num_layers) if (i + 1) % pattern)


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json dict.

    Args:
      hf_config: The parsed config.json (transformers 4 or 5 layout).

    Returns:
      A float32 `ModelConfig` whose `family` is the HF model_type.

    Raises:
      ValueError: for an unsupported model_type, architecture, rope type or activation.
    """
    hf = dict(hf_config)
    family = hf.get("model_type")
    if family not in SUPPORTED:
        raise ValueError(
            f"Unsupported model_type {family!r}; supported model types (architectures): "
            f"{_supported_text()}."
        )
    for arch in hf.get("architectures") or ():
        if arch not in SUPPORTED[family]:
            raise ValueError(
                f"Unsupported architecture {arch!r} for model_type {family!r}; supported "
                f"model types (architectures): {_supported_text()}."
            )
    tied = bool(hf.get("tie_word_embeddings", _TIED_DEFAULT[family]))
    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("gpt2 scale_attn_by_inverse_layer_idx=True is not supported.")
        d, heads = hf.get("n_embd", hf.get("hidden_size", 768)), hf.get("n_head", 12)
        return ModelConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            d_model=d,
            num_layers=hf.get("n_layer", 12),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d // heads,
            mlp_dim=hf.get("n_inner") or 4 * d,
            max_len=hf.get("n_positions", 1024),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_activation(hf.get("activation_function", "gelu_new")),
            positions="learned",
            tied_embeddings=tied,
            query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        )
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    common = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        positions="rotary",
        tied_embeddings=tied,
        **_rope(hf, family),
    )
    if family == "gpt_neox":
        bias = hf.get("attention_bias", True)
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            head_dim=d // heads,
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            activation=_activation(hf.get("hidden_act", "gelu")),
            attn_bias=bias,
            attn_out_bias=bias,
            mlp_bias=True,
            parallel_residual=hf.get("use_parallel_residual", True),
        )
    bias = hf.get("attention_bias", False)
    common.update(
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        gated_mlp=True,
        attn_bias=bias,
        attn_out_bias=bias,
    )
    if family == "llama":
        return ModelConfig(
            **common,
            head_dim=hf.get("head_dim") or d // heads,
            activation=_activation(hf.get("hidden_act", "silu")),
            mlp_bias=hf.get("mlp_bias", False),
        )
    # gemma2; defaults are Gemma2Config's.
    head_dim = hf.get("head_dim") or 256
    scalar = hf.get("query_pre_attn_scalar", 256)
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma2 use_bidirectional_attention=True is not supported.")
    sliding = _gemma2_sliding_layers(hf, common["num_layers"])
    return ModelConfig(
        **common,
        head_dim=head_dim,
        norm_offset=1.0,
        activation=_activation(hf.get("hidden_activation") or "gelu_pytorch_tanh"),
        mlp_bias=False,
        post_norms=True,
        embed_scale=True,
        query_scale=None if scalar == head_dim else float(scalar) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping", 50.0),
        final_softcap=hf.get("final_logit_softcapping", 30.0),
        sliding_window=hf.get("sliding_window", 4096) if sliding else None,
        sliding_layers=sliding,
    )


def _hf_activation(config: ModelConfig, family: str) -> str:
    if config.activation == "gelu_tanh":
        return "gelu_new" if family == "gpt2" else "gelu_pytorch_tanh"
    return config.activation


def _config_to_family(config: ModelConfig, family: str) -> dict[str, Any]:
    c = config
    act = _hf_activation(c, family)
    # Token ids are the tokenizer's business; HF's per-family defaults may lie outside V.
    out: dict[str, Any] = {
        "architectures": [SUPPORTED[family][0]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tied_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if family == "gpt2":
        scale = c.head_dim**-0.5 if c.query_scale is None else c.query_scale
        return dict(
            out,
            n_embd=c.d_model,
            n_layer=c.num_layers,
            n_head=c.num_heads,
            n_inner=c.mlp_dim,
            n_positions=c.max_len,
            layer_norm_epsilon=c.norm_eps,
            activation_function=act,
            scale_attn_weights=scale != 1.0,
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=c.rope_factor,
            low_freq_factor=c.rope_low_freq_factor,
            high_freq_factor=c.rope_high_freq_factor,
            original_max_position_embeddings=c.rope_original_max_len,
        )
    out.update(
        hidden_size=c.d_model,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        max_position_embeddings=c.max_len,
        attention_bias=c.attn_bias,
        # transformers 4 reads these (transformers 5 reads them too, consistently).
        rope_theta=c.rope_theta,
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}
        if c.rope_scaling
        else None,
    )
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = c.rotary_fraction
        out.update(rotary_pct=c.rotary_fraction, rotary_emb_base=c.rope_theta)
    out["rope_parameters"] = rope  # transformers 5
    if family == "gpt_neox":
        return dict(
            out,
            hidden_act=act,
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
        )
    out.update(num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim)
    out.update(rms_norm_eps=c.norm_eps)
    if family == "llama":
        return dict(out, hidden_act=act, mlp_bias=c.mlp_bias)
    scale = c.head_dim**-0.5 if c.query_scale is None else c.query_scale
    scalar = scale**-2
    return dict(
        out,
        hidden_activation=act,
        query_pre_attn_scalar=round(scalar) if math.isclose(scalar, round(scalar)) else scalar,
        attn_logit_softcapping=c.attn_softcap,
        final_logit_softcapping=c.final_softcap,
        sliding_window=c.sliding_window,
        layer_types=[
            "sliding_attention" if i in c.sliding_layers else "full_attention"
            for i in range(c.num_layers)
        ],
    )


def _effective(config: ModelConfig) -> dict[str, Any]:
    """The fields that change the function computed, with inert ones reset to defaults."""
    c = config.replace(family="custom", dtype="float32", param_dtype="float32")
    if c.query_scale is None:
        c = c.replace(query_scale=c.head_dim**-0.5)
    default = ModelConfig()
    if c.positions == "learned":
        c = c.replace(rotary_fraction=1.0, rope_theta=default.rope_theta, rope_scaling=None)
    if c.rope_scaling is None:
        c = c.replace(
            rope_factor=default.rope_factor,
            rope_low_freq_factor=default.rope_low_freq_factor,
            rope_high_freq_factor=default.rope_high_freq_factor,
            rope_original_max_len=default.rope_original_max_len,
        )
    if not c.sliding_layers:
        c = c.replace(sliding_window=None)
    return c.to_dict()


def _differences(config: ModelConfig, family: str) -> list[str]:
    try:
        back = _effective(config_from_hf(_config_to_family(config, family)))
    except ValueError as error:
        return [str(error)]
    want = _effective(config)
    return [
        f"{key}={want[key]!r}"
        for key in want
        if not (
            want[key] == back[key]
            or (
                isinstance(want[key], float)
                and isinstance(back[key], float)
                and math.isclose(want[key], back[key], rel_tol=1e-9)
            )
        )
    ]


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers config.json dict for `config`.

    A 'custom' config is written as the first family that represents it exactly.

    Raises:
      ValueError: naming the fields the family's HF model cannot express.
    """
    families = [config.family] if config.family in SUPPORTED else list(SUPPORTED)
    problems = {}
    for family in families:
        problems[family] = _differences(config, family)
        if not problems[family]:
            return _config_to_family(config, family)
    detail = "; ".join(f"{f}: {', '.join(p)}" for f, p in problems.items())
    raise ValueError(
        f"ModelConfig(family={config.family!r}) has no Hugging Face equivalent; fields each "
        f"family cannot express: {detail}."
    )
