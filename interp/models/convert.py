"""Hugging Face configs and tensors <-> `ModelConfig` and parameters, one name map per family.

Folders (safetensors files, from_pretrained/save_pretrained) are in `pretrained.py`.

Families: gpt2, gpt_neox (Pythia), llama, gemma2. `config_from_hf` reads both the transformers
4 layout of config.json (top-level `rope_theta`/`rope_scaling`, NeoX `rotary_pct`, Gemma 2
without `layer_types`) and the transformers 5 one (`rope_parameters`). Conversion is pure
NumPy and exact: `params_to_hf(hf_to_params(t, c), c)` is bit-identical to `t`.

Weight layouts, with the legend of `transformer.py`: HF `nn.Linear` weights are [out, in];
GPT-2 `Conv1D` weights are [in, out]; GPT-NeoX fuses q, k, v into one [3 * N * H, D] matrix laid
out head by head, [q_0, k_0, v_0, q_1, ...]. Ours: q/k/v kernels [D, N, H], o kernel [N, H, D],
MLP kernels [D, F] / [F, D], lm_head [D, V]. Tied embeddings have no lm_head.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

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
# Non-persistent buffers that old checkpoints carry: causal masks and rotary tables.
_IGNORED = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "gpt_neox": re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),
    "gemma2": re.compile(r"\.rotary_emb\.inv_freq$"),
}
_LM_HEAD = {"gpt2": "lm_head.weight", "gpt_neox": "embed_out.weight"}

# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


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


# ----------------------------------------------------------------------------------------------
# Name maps


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the parameter(s) it holds."""

    name: str
    shape: tuple[int, ...]
    paths: tuple[str, ...]  # '/'-joined parameter paths
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _reshaped(name, path, hf_shape, our_shape) -> _Tensor:
    """Same element order (biases, norms, embeddings, Conv1D [in, out] kernels)."""
    return _Tensor(
        name,
        tuple(hf_shape),
        (path,),
        lambda w: (w.reshape(our_shape),),
        lambda w: w.reshape(hf_shape),
    )


def _linear(name, path, hf_shape, our_shape) -> _Tensor:
    """An nn.Linear weight [out, in]; ours is [in, out] with in/out possibly split."""
    return _Tensor(
        name,
        tuple(hf_shape),
        (path,),
        lambda w: (w.T.reshape(our_shape),),
        lambda w: w.reshape(hf_shape[::-1]).T,
    )


def _norm(prefix, path, config) -> list[_Tensor]:
    d = (config.d_model,)
    out = [_reshaped(f"{prefix}.weight", f"{path}/scale", d, d)]
    if config.norm == "layernorm":
        out.append(_reshaped(f"{prefix}.bias", f"{path}/bias", d, d))
    return out


def _gpt2_map(c: ModelConfig, prefix: str) -> list[_Tensor]:
    d, n, h, f = c.d_model, c.num_heads, c.head_dim, c.mlp_dim
    out = [
        _reshaped(f"{prefix}wte.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        _reshaped(f"{prefix}wpe.weight", "pos_embed", (c.max_len, d), (c.max_len, d)),
        *_norm(f"{prefix}ln_f", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"{prefix}h.{i}", f"blocks_{i}"
        qkv = [f"{ours}/attn/{x}_kernel" for x in "qkv"]
        qkv_bias = [f"{ours}/attn/{x}_bias" for x in "qkv"]
        out += [
            *_norm(f"{hf}.ln_1", f"{ours}/ln_1", c),
            *_norm(f"{hf}.ln_2", f"{ours}/ln_2", c),
            # Conv1D c_attn: [D, 3D], columns q | k | v.
            _Tensor(
                f"{hf}.attn.c_attn.weight",
                (d, 3 * d),
                tuple(qkv),
                lambda w: tuple(p.reshape(d, n, h) for p in np.split(w, 3, axis=1)),
                lambda *ws: np.concatenate([w.reshape(d, d) for w in ws], axis=1),
            ),
            _Tensor(
                f"{hf}.attn.c_attn.bias",
                (3 * d,),
                tuple(qkv_bias),
                lambda b: tuple(p.reshape(n, h) for p in np.split(b, 3)),
                lambda *bs: np.concatenate([b.reshape(d) for b in bs]),
            ),
            _reshaped(f"{hf}.attn.c_proj.weight", f"{ours}/attn/o_kernel", (d, d), (n, h, d)),
            _reshaped(f"{hf}.attn.c_proj.bias", f"{ours}/attn/o_bias", (d,), (d,)),
            _reshaped(f"{hf}.mlp.c_fc.weight", f"{ours}/mlp/up_kernel", (d, f), (d, f)),
            _reshaped(f"{hf}.mlp.c_fc.bias", f"{ours}/mlp/up_bias", (f,), (f,)),
            _reshaped(f"{hf}.mlp.c_proj.weight", f"{ours}/mlp/down_kernel", (f, d), (f, d)),
            _reshaped(f"{hf}.mlp.c_proj.bias", f"{ours}/mlp/down_bias", (d,), (d,)),
        ]
    return out


def _neox_map(c: ModelConfig) -> list[_Tensor]:
    d, n, h, f = c.d_model, c.num_heads, c.head_dim, c.mlp_dim
    p = "gpt_neox."
    out = [
        _reshaped(f"{p}embed_in.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        *_norm(f"{p}final_layer_norm", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"{p}layers.{i}", f"blocks_{i}"
        out += [
            *_norm(f"{hf}.input_layernorm", f"{ours}/ln_1", c),
            *_norm(f"{hf}.post_attention_layernorm", f"{ours}/ln_2", c),
            # Rows are per head [q_h, k_h, v_h]: view as [N, 3, H, D].
            _Tensor(
                f"{hf}.attention.query_key_value.weight",
                (3 * d, d),
                tuple(f"{ours}/attn/{x}_kernel" for x in "qkv"),
                lambda w: tuple(w.reshape(n, 3, h, d)[:, j].transpose(2, 0, 1) for j in range(3)),
                lambda *ws: np.stack([w.transpose(1, 2, 0) for w in ws], 1).reshape(3 * d, d),
            ),
            _linear(f"{hf}.attention.dense.weight", f"{ours}/attn/o_kernel", (d, d), (n, h, d)),
            _linear(f"{hf}.mlp.dense_h_to_4h.weight", f"{ours}/mlp/up_kernel", (f, d), (d, f)),
            _reshaped(f"{hf}.mlp.dense_h_to_4h.bias", f"{ours}/mlp/up_bias", (f,), (f,)),
            _linear(f"{hf}.mlp.dense_4h_to_h.weight", f"{ours}/mlp/down_kernel", (d, f), (f, d)),
            _reshaped(f"{hf}.mlp.dense_4h_to_h.bias", f"{ours}/mlp/down_bias", (d,), (d,)),
        ]
        if c.attn_bias:
            out += [
                _Tensor(
                    f"{hf}.attention.query_key_value.bias",
                    (3 * d,),
                    tuple(f"{ours}/attn/{x}_bias" for x in "qkv"),
                    lambda b: tuple(b.reshape(n, 3, h)[:, j] for j in range(3)),
                    lambda *bs: np.stack(bs, 1).reshape(3 * d),
                ),
                _reshaped(f"{hf}.attention.dense.bias", f"{ours}/attn/o_bias", (d,), (d,)),
            ]
    return out


def _llama_map(c: ModelConfig) -> list[_Tensor]:
    """Llama and Gemma 2 (which adds two post-norms and renames the pre-MLP norm)."""
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    out = [
        _reshaped("model.embed_tokens.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        *_norm("model.norm", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", f"blocks_{i}"
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        out += _norm(f"{hf}.input_layernorm", f"{ours}/ln_1", c)
        if c.post_norms:
            out += _norm(f"{hf}.post_attention_layernorm", f"{ours}/post_attn_norm", c)
            out += _norm(f"{hf}.pre_feedforward_layernorm", f"{ours}/ln_2", c)
            out += _norm(f"{hf}.post_feedforward_layernorm", f"{ours}/post_mlp_norm", c)
        else:
            out += _norm(f"{hf}.post_attention_layernorm", f"{ours}/ln_2", c)
        for x, heads in (("q", n), ("k", k), ("v", k)):
            out.append(
                _linear(
                    f"{attn}.{x}_proj.weight",
                    f"{ours}/attn/{x}_kernel",
                    (heads * h, d),
                    (d, heads, h),
                )
            )
            if c.attn_bias:
                out.append(
                    _reshaped(
                        f"{attn}.{x}_proj.bias", f"{ours}/attn/{x}_bias", (heads * h,), (heads, h)
                    )
                )
        out.append(_linear(f"{attn}.o_proj.weight", f"{ours}/attn/o_kernel", (d, n * h), (n, h, d)))
        if c.attn_out_bias:
            out.append(_reshaped(f"{attn}.o_proj.bias", f"{ours}/attn/o_bias", (d,), (d,)))
        for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            out.append(
                _linear(f"{mlp}.{x}_proj.weight", f"{ours}/mlp/{x}_kernel", shape, shape[::-1])
            )
            if c.mlp_bias:
                out.append(
                    _reshaped(f"{mlp}.{x}_proj.bias", f"{ours}/mlp/{x}_bias", shape[:1], shape[:1])
                )
    return out


def _name_map(config: ModelConfig, gpt2_prefix: str = "transformer.") -> list[_Tensor]:
    family = config.family
    if family == "gpt2":
        out = _gpt2_map(config, gpt2_prefix)
    elif family == "gpt_neox":
        out = _neox_map(config)
    elif family in ("llama", "gemma2"):
        out = _llama_map(config)
    else:
        raise ValueError(
            f"No Hugging Face name map for family {config.family!r}; supported: "
            f"{sorted(SUPPORTED)}."
        )
    if not config.tied_embeddings:
        v, d = config.vocab_size, config.d_model
        out.append(_linear(_LM_HEAD.get(family, "lm_head.weight"), "lm_head", (v, d), (d, v)))
    return out


def _where(source: str | Mapping[str, str], name: str | None = None) -> str:
    if isinstance(source, str):
        return source
    if name is not None and name in source:
        return source[name]
    return ", ".join(sorted(set(source.values()))) or "no files"


def hf_to_params(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    source: str | Mapping[str, str] = "the given tensors",
) -> dict[str, Any]:
    """Our parameter tree from a Hugging Face state dict.

    Args:
      tensors: {HF tensor name: array} (NumPy or anything `np.asarray` takes).
      config: The model's config; `family` selects the name map. Parameters are stored in
        `config.param_dtype`.
      source: For error messages: the file the tensors came from, or {name: file}.

    Returns:
      Nested dicts of NumPy arrays, the `params` of `Transformer(config)`.

    Raises:
      ValueError: naming a missing tensor, a leftover tensor, or a shape mismatch (with both
        shapes and the file).
    """
    family = config.family
    names = dict.fromkeys(tensors)
    if family == "gpt_neox" and "lm_head.weight" in names:  # transformers 5 in-memory name
        tensors = dict(tensors)
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
        source = (
            source
            if isinstance(source, str)
            else {**source, "embed_out.weight": source.get("lm_head.weight", "")}
        )
        names = dict.fromkeys(tensors)
    prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    entries = _name_map(config, gpt2_prefix=prefix)
    expected = {e.name for e in entries}
    missing = [e for e in entries if e.name not in names]
    if missing:
        lines = []
        for e in missing[:5]:
            close = difflib.get_close_matches(e.name, list(names), n=2)
            hint = f" (similar names present: {close})" if close else ""
            lines.append(f"{e.name!r} (expected shape {e.shape}){hint}")
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"Missing tensor(s) for a {family} model in {_where(source)}: {', '.join(lines)}{more}."
        )
    ignored = _IGNORED.get(family)
    leftover = [n for n in names if n not in expected and not (ignored and ignored.search(n))]
    head = _LM_HEAD.get(family, "lm_head.weight")
    if config.tied_embeddings and head in leftover:
        # Some exporters write the tied head anyway; accept it only if it really is tied.
        embed = next(e.name for e in entries if e.paths == ("embed",))
        if not np.array_equal(np.asarray(tensors[head]), np.asarray(tensors[embed])):
            raise ValueError(
                f"Tensor {head!r} in {_where(source, head)} differs from {embed!r}, but the "
                "config ties the embeddings (tie_word_embeddings=True)."
            )
        leftover.remove(head)
    if leftover:
        shown = ", ".join(
            f"{n!r} (shape {tuple(np.shape(tensors[n]))}, in {_where(source, n)})"
            for n in leftover[:5]
        )
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ValueError(
            f"Unexpected tensor(s) that a {family} model with this config does not use: "
            f"{shown}{more}. Does config.json match the weights?"
        )
    params: dict[str, Any] = {}
    dtype = config.storage_dtype
    for e in entries:
        value = tensors[e.name]
        if tuple(value.shape) != e.shape:
            raise ValueError(
                f"Tensor {e.name!r} in {_where(source, e.name)} has shape "
                f"{tuple(value.shape)}; expected {e.shape} from the config."
            )
        for path, array in zip(e.paths, e.to_ours(np.asarray(value)), strict=True):
            *parents, leaf = path.split("/")
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            # A C-ordered copy: never a view into a memory-mapped file.
            node[leaf] = np.array(array, dtype=dtype, order="C")
    return params


def params_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of our params; the exact inverse of `hf_to_params`.

    Arrays keep the params' dtype. Raises ValueError for a missing, extra or misshapen param.
    """
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    entries = _name_map(config)
    used = {p for e in entries for p in e.paths}
    missing = sorted(used - set(flat))
    extra = sorted(set(flat) - used)
    if missing or extra:
        raise ValueError(
            f"Params do not match ModelConfig(family={config.family!r}): missing {missing}, "
            f"unexpected {extra}."
        )
    out = {}
    for e in entries:
        value = np.ascontiguousarray(e.to_hf(*(np.asarray(flat[p]) for p in e.paths)))
        if value.shape != e.shape:
            raise ValueError(
                f"Params for {e.name!r} ({', '.join(e.paths)}) give shape {value.shape}; "
                f"expected {e.shape}."
            )
        out[e.name] = value
    return out
