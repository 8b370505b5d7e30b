"""Hugging Face config.json <-> `ModelConfig`.

Families (model_type): gpt2, gpt_neox (Pythia), llama, gemma2, gemma3_text (Gemma 3's text
model), qwen2 (Qwen 2 and 2.5), qwen3, mistral. A multimodal Gemma 3 config (model_type gemma3)
reads as its language model, a gemma3_text config (`hf_params` then skips the vision tower;
exports are text-only Gemma3ForCausalLM folders). The Llama-like ones (all but gpt2 and
gpt_neox) are rows of one table, `_FAMILIES`: what each fixes and which config.json keys it
reads.

`config_from_hf` reads both the transformers 4 layout of config.json (Gemma 2/3 and Qwen
without `layer_types`, Qwen's `max_window_layers`) and the transformers 5 one; `config_to_hf`
writes both, and refuses a config that the family's HF model cannot express. Options we do not
model (bidirectional attention, biases a family has no place for, ...) are errors naming the
option, never ignored.

The rotary settings (both layouts; rope types default, linear, dynamic, yarn, llama3) are read
and written in `hf_rope.py`, parameters mapped in `hf_params.py`; folders (safetensors files,
from_pretrained/save_pretrained) are in `pretrained.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from interp.models import hf_rope
from interp.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class _Family:
    """A Llama-like family: what it fixes, what it reads, and its config class's defaults."""

    architectures: tuple[str, ...]
    tied: bool = False  # tie_word_embeddings when absent
    # 'attention_bias': q/k/v/o biases per that key; 'qkv': always q/k/v, never o; 'none'.
    bias: str = "attention_bias"
    mlp_bias: bool = False  # Reads `mlp_bias` (else a true `mlp_bias` is refused).
    head_dim: int | None = None  # When config.json has none; None: hidden_size // heads.
    activation_key: str = "hidden_act"
    activation: str = "silu"
    qk_norm: bool = False  # Per-head RMSNorm on q and k.
    gemma: bool = False  # (1 + w) norms, post-norms, sqrt(D) embeddings, query_pre_attn_scalar
    softcaps: tuple[float | None, float | None] = (None, None)  # attention, final defaults
    # Which layers slide: 'layer_types' (else every `pattern`-th layer is global), 'qwen'
    # (`use_sliding_window`: layer_types, else layers from max_window_layers on), 'all'
    # (every layer when sliding_window is set), 'none'.
    sliding: str = "none"
    pattern: int = 0
    local_rope: bool = False  # Sliding layers rotate unscaled with `rope_local_base_freq`.
    rope_theta: float = 10_000.0
    max_len: int = 2048


_FAMILIES = {
    "llama": _Family(("LlamaForCausalLM",), mlp_bias=True),
    "gemma2": _Family(
        ("Gemma2ForCausalLM",),
        tied=True,
        head_dim=256,
        activation_key="hidden_activation",
        activation="gelu_pytorch_tanh",
        gemma=True,
        softcaps=(50.0, 30.0),
        sliding="layer_types",
        pattern=2,
        max_len=8192,
    ),
    "gemma3_text": _Family(
        ("Gemma3ForCausalLM",),
        tied=True,
        head_dim=256,
        activation_key="hidden_activation",
        activation="gelu_pytorch_tanh",
        qk_norm=True,
        gemma=True,
        sliding="layer_types",
        pattern=6,
        local_rope=True,
        rope_theta=1_000_000.0,
        max_len=131_072,
    ),
    "qwen2": _Family(("Qwen2ForCausalLM",), bias="qkv", sliding="qwen", max_len=32_768),
    "qwen3": _Family(
        ("Qwen3ForCausalLM",), head_dim=128, qk_norm=True, sliding="qwen", max_len=32_768
    ),
    "mistral": _Family(("MistralForCausalLM",), bias="none", sliding="all", max_len=131_072),
}
SUPPORTED = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "gpt_neox": ("GPTNeoXForCausalLM",),
    **{name: family.architectures for name, family in _FAMILIES.items()},
}
_TIED_DEFAULT = {
    "gpt2": True,
    "gpt_neox": False,
    **{name: family.tied for name, family in _FAMILIES.items()},
}
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


def _max_len(hf: Mapping[str, Any], family: str) -> int:
    default = _FAMILIES[family].max_len if family in _FAMILIES else 2048
    return hf.get("max_position_embeddings", default)


def _sliding(hf: Mapping[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """sliding_window and sliding_layers of a Llama-like family."""
    rule = _FAMILIES[family]
    window = hf.get("sliding_window")
    kinds = list(hf.get("layer_types") or ())
    if rule.sliding == "qwen":
        if not hf.get("use_sliding_window", False):
            window = None  # As transformers: the window exists only when switched on.
        if not kinds:  # transformers 4: with a window, layers from max_window_layers on slide.
            first = hf.get("max_window_layers", 28) if window is not None else num_layers
            kinds = [
                "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
            ]
    elif rule.sliding == "layer_types" and not kinds:
        # Older configs: every `pattern`-th layer is global, the others slide.
        pattern = int(hf.get("sliding_window_pattern", rule.pattern))
        kinds = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    elif rule.sliding == "all":
        if kinds and set(kinds) != {"sliding_attention" if window else "full_attention"}:
            raise ValueError(
                f"{family} layer_types={kinds} is not supported: MistralForCausalLM slides on "
                "every layer when sliding_window is set (mixed layers are Ministral's)."
            )
        kinds = ["sliding_attention" if window else "full_attention"] * num_layers
    elif rule.sliding == "none":
        kinds = []
    unknown = set(kinds) - {"sliding_attention", "full_attention"}
    if unknown or (kinds and len(kinds) != num_layers):
        raise ValueError(f"Unsupported {family} layer_types {kinds}.")
    layers = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    if window is None and layers:
        if family == "gemma2":  # No window: gemma2's sliding layers attend fully.
            return {"sliding_window": None, "sliding_layers": ()}
        reason = "use_sliding_window is false" if rule.sliding == "qwen" else "sliding_window=None"
        raise ValueError(
            f"{family} has sliding layers (layer_types, or their default pattern) but {reason}."
        )
    return {"sliding_window": int(window) if layers else None, "sliding_layers": layers}


def _refuse(hf: Mapping[str, Any], family: str) -> None:
    """Errors for options of the family's transformers model that we do not model."""
    rule = _FAMILIES[family]
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{family} use_bidirectional_attention=True is not supported.")
    if hf.get("mlp_bias") and not rule.mlp_bias:
        raise ValueError(f"{family} mlp_bias=True is not supported: its MLP has no biases.")
    if rule.bias == "none" and hf.get("attention_bias"):
        raise ValueError(f"{family} attention_bias=True is not supported: it has no biases.")
    if rule.bias == "qkv" and hf.get("attention_bias", True) is not True:
        raise ValueError(
            f"{family} attention_bias={hf['attention_bias']!r} is not supported: "
            f"{rule.architectures[0]} always has q/k/v biases (and no output bias)."
        )


# Gemma3TextConfig's defaults, on which the text_config of multimodal Hub configs relies.
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
)


def _gemma3_language_model(hf: Mapping[str, Any]) -> ModelConfig:
    """Multimodal Gemma 3: the config of its language model (a gemma3_text ModelConfig)."""
    for arch in hf.get("architectures") or ():
        if arch != "Gemma3ForConditionalGeneration":
            raise ValueError(
                f"Unsupported architecture {arch!r} for model_type 'gemma3'; supported: "
                "Gemma3ForConditionalGeneration (its language model only)."
            )
    text = dict(_GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {}))
    if text.setdefault("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"gemma3 text_config has model_type {text['model_type']!r}.")
    text.pop("architectures", None)
    if text.get("final_logit_softcapping") is not None:
        raise ValueError(
            "gemma3 text_config final_logit_softcapping="
            f"{text['final_logit_softcapping']} is not supported: "
            "Gemma3ForConditionalGeneration does not apply it (Gemma3ForCausalLM does)."
        )
    if "tie_word_embeddings" in hf:  # The multimodal model ties (or not) as a whole.
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return config_from_hf(text)


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json dict.

    Args:
      hf_config: The parsed config.json (transformers 4 or 5 layout).

    Returns:
      A float32 `ModelConfig` whose `family` is the HF model_type.

    Raises:
      ValueError: for an unsupported model_type, architecture, rope type, activation or other
        option, naming it.
    """
    hf = dict(hf_config)
    family = hf.get("model_type")
    if family == "gemma3":
        return _gemma3_language_model(hf)
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
        max_len=_max_len(hf, family),
        positions="rotary",
        tied_embeddings=tied,
        **hf_rope.rope_from_hf(
            hf,
            family,
            max_len=_max_len(hf, family),
            default_theta=_FAMILIES[family].rope_theta if family in _FAMILIES else 10_000.0,
            local_rope=family in _FAMILIES and _FAMILIES[family].local_rope,
        ),
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
    rule = _FAMILIES[family]
    _refuse(hf, family)
    bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim") or rule.head_dim or d // heads
    gemma = {}
    if rule.gemma:
        scalar = hf.get("query_pre_attn_scalar", 256)
        gemma = dict(
            norm_offset=1.0,
            post_norms=True,
            embed_scale=True,
            query_scale=None if scalar == head_dim else float(scalar) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping", rule.softcaps[0]),
            final_softcap=hf.get("final_logit_softcapping", rule.softcaps[1]),
        )
    return ModelConfig(
        **common,
        **gemma,
        **_sliding(hf, family, common["num_layers"]),
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=_activation(hf.get(rule.activation_key) or rule.activation),
        gated_mlp=True,
        attn_bias={"attention_bias": bias, "qkv": True, "none": False}[rule.bias],
        attn_out_bias=bias if rule.bias == "attention_bias" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if rule.mlp_bias else False,
        qk_norm=rule.qk_norm,
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
    rope = hf_rope.rope_to_hf(c)
    out.update(
        hidden_size=c.d_model,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        max_position_embeddings=c.max_len,
        # transformers 4 reads these (transformers 5 reads them too, consistently).
        rope_theta=c.rope_theta,
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}
        if c.rope_scaling
        else None,
    )
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = c.rotary_fraction
        return dict(
            out,
            rope_parameters=rope,  # transformers 5
            attention_bias=c.attn_bias,
            rotary_pct=c.rotary_fraction,
            rotary_emb_base=c.rope_theta,
            hidden_act=act,
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
        )
    rule = _FAMILIES[family]
    out.update(num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps)
    out[rule.activation_key] = act
    out["rope_parameters"] = rope
    if rule.local_rope:
        local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
        out.update(
            rope_local_base_freq=local,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
                "full_attention": rope,
            },
        )
    if rule.bias == "attention_bias":
        out["attention_bias"] = c.attn_bias
    if rule.mlp_bias:
        out["mlp_bias"] = c.mlp_bias
    if rule.gemma:
        scale = c.head_dim**-0.5 if c.query_scale is None else c.query_scale
        scalar = scale**-2
        out.update(
            query_pre_attn_scalar=round(scalar) if math.isclose(scalar, round(scalar)) else scalar,
            attn_logit_softcapping=c.attn_softcap,
            final_logit_softcapping=c.final_softcap,
        )
    kinds = [
        "sliding_attention" if i in c.sliding_layers else "full_attention"
        for i in range(c.num_layers)
    ]
    if rule.sliding == "layer_types":
        out.update(sliding_window=c.sliding_window, layer_types=kinds)
    elif rule.sliding == "qwen":
        out.update(
            use_sliding_window=bool(c.sliding_layers),
            sliding_window=c.sliding_window if c.sliding_layers else None,
            # transformers 4 reads max_window_layers, 5 layer_types.
            max_window_layers=min(c.sliding_layers, default=c.num_layers),
            layer_types=kinds,
        )
    elif rule.sliding == "all":
        out["sliding_window"] = c.sliding_window if c.sliding_layers else None
    return out


def _effective(config: ModelConfig) -> dict[str, Any]:
    """The fields that change the function computed, with inert ones reset to defaults."""
    c = config.replace(family="custom", dtype="float32", param_dtype="float32")
    if c.query_scale is None:
        c = c.replace(query_scale=c.head_dim**-0.5)
    default = ModelConfig()
    if c.positions == "learned":
        c = c.replace(
            rotary_fraction=1.0,
            rope_theta=default.rope_theta,
            rope_scaling=None,
            rope_local_theta=None,
        )
    if not c.sliding_layers:
        c = c.replace(sliding_window=None, rope_local_theta=None)
    if c.rope_local_theta == c.rope_theta and c.rope_scaling is None:
        c = c.replace(rope_local_theta=None)
    used = {
        None: (),
        "linear": ("rope_factor",),
        "dynamic": ("rope_factor",),
        "yarn": (
            "rope_factor",
            "rope_original_max_len",
            "rope_beta_fast",
            "rope_beta_slow",
            "rope_attention_factor",
            "rope_truncate",
        ),
        "llama3": (
            "rope_factor",
            "rope_low_freq_factor",
            "rope_high_freq_factor",
            "rope_original_max_len",
        ),
    }[c.rope_scaling]
    scaling_fields = {f.name for f in dataclasses.fields(c) if f.name.startswith("rope_")}
    scaling_fields -= {"rope_theta", "rope_scaling", "rope_local_theta"}
    c = c.replace(**{f: getattr(default, f) for f in scaling_fields - set(used)})
    if c.rope_scaling == "yarn":
        c = c.replace(rope_attention_factor=c.yarn_attention_factor)
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
