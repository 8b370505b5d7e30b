"""Tests for interp.models.hf_config: both config.json layouts, and what a family cannot express.

That the configs give transformers' logits is checked with the parameters, in hf_params_test.
"""

import pytest

from interp.models import hf_config
from interp.models.config import ModelConfig
from tests.models import hf_testing


def test_unknown_model_type_or_architecture_lists_supported():
    families = r"(?s)'mamba'.*gpt2.*gpt_neox.*llama.*gemma2.*gemma3_text.*qwen2.*qwen3.*mistral"
    with pytest.raises(ValueError, match=families):
        hf_config.config_from_hf({"model_type": "mamba"})
    # Multimodal Gemma 3 reads as its language model; Hub text_configs rely on the defaults.
    multimodal = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34}
    text.update(rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    config = hf_config.config_from_hf(dict(multimodal, text_config=text))  # gemma-3-4b's
    assert (config.family, config.vocab_size, config.num_heads, config.head_dim) == (
        "gemma3_text",
        262_208,
        8,
        256,
    )
    assert (config.rope_theta, config.rope_local_theta, config.rope_factor) == (1e6, 1e4, 8)
    assert config.sliding_layers == tuple(i for i in range(34) if (i + 1) % 6)
    with pytest.raises(ValueError, match=r"'Gemma3Model'.*Gemma3ForConditionalGeneration"):
        hf_config.config_from_hf(dict(multimodal, architectures=["Gemma3Model"]))
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0 .*does not apply it"):
        softcap = dict(text, final_logit_softcapping=30.0)
        hf_config.config_from_hf(dict(multimodal, text_config=softcap))
    hf = hf_testing.hf_config("llama_gqa_llama3").to_dict()
    hf["architectures"] = ["LlamaForSequenceClassification"]
    with pytest.raises(ValueError, match=r"(?s)'LlamaForSequenceClassification'.*LlamaForCausalLM"):
        hf_config.config_from_hf(hf)


def test_old_and_new_config_layouts_agree():
    # Llama: transformers 4 puts rope_theta / rope_scaling at the top level.
    new = hf_testing.hf_config("llama_gqa_llama3").to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "head_dim")}
    rope = dict(new["rope_parameters"])
    old.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    assert hf_config.config_from_hf(old) == hf_config.config_from_hf(new)
    assert hf_config.config_from_hf(new).head_dim == 16  # derived when absent
    # GPT-NeoX: rotary_pct / rotary_emb_base.
    new = hf_testing.hf_config("neox_parallel").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rotary_pct=0.25, rotary_emb_base=10_000)
    assert hf_config.config_from_hf(old) == hf_config.config_from_hf(new)
    config = hf_config.config_from_hf(new)
    assert (config.rotary_fraction, config.activation, config.tied_embeddings) == (0.25, "gelu", 0)
    # Gemma 2: no layer_types means even layers slide.
    new = hf_testing.hf_config("gemma2").to_dict()
    old = {k: v for k, v in new.items() if k != "layer_types"}
    assert hf_config.config_from_hf(old) == hf_config.config_from_hf(new)
    config = hf_config.config_from_hf(new)
    assert config.sliding_layers == (0, 2) and config.sliding_window == 4
    assert config.activation == "gelu_tanh" and config.tied_embeddings
    # Gemma 3: transformers 4 keeps the global rotary at the top level (rope_scaling applies to
    # it only), the local base in rope_local_base_freq, and derives the 5:1 pattern.
    new = hf_testing.hf_config("gemma3").to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=100, rope_scaling=dict(type="linear", factor=4))
    assert hf_config.config_from_hf(old) == hf_config.config_from_hf(new)
    config = hf_config.config_from_hf(new)
    assert config.sliding_layers == (0, 1, 2, 3, 4) and config.sliding_window == 4
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (1e6, 100, "linear")
    assert config.qk_norm and config.tied_embeddings and config.query_scale == 24**-0.5
    assert (config.attn_softcap, config.final_softcap) == (None, 3.0)
    # Qwen 2: transformers 4 has max_window_layers instead of layer_types; the window exists
    # only with use_sliding_window (released Qwen 2.5 configs carry one, switched off).
    new = hf_testing.hf_config("qwen2").to_dict()
    old = {k: v for k, v in new.items() if k != "layer_types"}
    assert hf_config.config_from_hf(old) == hf_config.config_from_hf(new)
    config = hf_config.config_from_hf(new)
    assert config.sliding_layers == (1, 2) and (config.attn_bias, config.attn_out_bias) == (1, 0)
    off = hf_config.config_from_hf(dict(old, use_sliding_window=False, sliding_window=131072))
    assert off.sliding_layers == () and off.sliding_window is None
    # Qwen 3: head_dim is its own; Mistral: a null window is full attention.
    assert hf_config.config_from_hf(hf_testing.hf_config("qwen3").to_dict()).head_dim == 24
    mistral = hf_testing.hf_config("mistral").to_dict()
    assert hf_config.config_from_hf(mistral).sliding_layers == (0, 1)
    assert hf_config.config_from_hf(dict(mistral, sliding_window=None)).sliding_layers == ()
    # GPT-2: tanh GELU, tied by default.
    config = hf_config.config_from_hf(hf_testing.hf_config("gpt2").to_dict())
    assert config.activation == "gelu_tanh" and config.tied_embeddings and config.mlp_dim == 256


def test_config_to_hf_refuses_what_a_family_cannot_express():
    llama = hf_config.config_from_hf(hf_testing.hf_config("llama_gqa_llama3").to_dict())
    assert hf_config.config_from_hf(hf_config.config_to_hf(llama)) == llama
    with pytest.raises(ValueError, match="post_norms"):
        hf_config.config_to_hf(llama.replace(post_norms=True))
    # A framework-trained 'custom' config goes out as the family that expresses it.
    custom = ModelConfig(norm="rmsnorm", gated_mlp=True, positions="rotary", activation="silu")
    custom = custom.replace(attn_bias=False, attn_out_bias=False, mlp_bias=False)
    assert hf_config.config_to_hf(custom)["model_type"] == "llama"
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        hf_config.config_to_hf(custom.replace(parallel_residual=True))


@pytest.mark.parametrize(
    "variant, change, message",
    [
        (
            "llama_gqa_llama3",
            dict(rope_scaling=dict(rope_type="longrope", factor=2.0)),
            r"rope type 'longrope'.*supported: default, linear, dynamic, yarn, llama3",
        ),
        (
            "qwen3",
            dict(rope_parameters=dict(rope_type="yarn", factor=2.0, mrope_section=[2])),
            r"yarn rope parameter\(s\) \['mrope_section'\]",
        ),
        ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            "gemma3",
            dict(
                rope_parameters=dict(
                    full_attention=dict(rope_type="default", rope_theta=1e6),
                    sliding_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
                )
            ),
            r"sliding_attention.*'default'",
        ),
        ("gemma3", dict(sliding_window=None), "sliding_window=None"),
        ("qwen2", dict(attention_bias=False), r"attention_bias=False.*always has q/k/v biases"),
        ("qwen2", dict(mlp_bias=True), "mlp_bias=True"),
        (
            "qwen3",
            dict(use_sliding_window=False, layer_types=["sliding_attention"] * 2),
            "use_sliding_window is false",
        ),
        ("mistral", dict(attention_bias=True), "attention_bias=True"),
        ("mistral", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ],
)
def test_unsupported_options_are_errors_naming_them(variant, change, message):
    hf = dict(hf_testing.hf_config(variant).to_dict(), **change)
    with pytest.raises(ValueError, match=message):
        hf_config.config_from_hf(hf)


@pytest.mark.parametrize(
    "variant, change, field",
    [
        ("qwen2", dict(attn_out_bias=True), "attn_out_bias"),
        ("qwen3", dict(post_norms=True), "post_norms"),
        ("mistral", dict(sliding_layers=(0,)), "sliding_layers"),  # all layers or none
        ("mistral", dict(attn_bias=True), "attn_bias"),
        ("llama_gqa_llama3", dict(qk_norm=True), "qk_norm"),
        # Gemma 3's local layers never scale their rotary.
        ("gemma3", dict(rope_local_theta=None), "rope_local_theta"),
    ],
)
def test_config_to_hf_names_what_a_new_family_cannot_express(variant, change, field):
    config = hf_config.config_from_hf(hf_testing.hf_config(variant).to_dict())
    assert hf_config.config_from_hf(hf_config.config_to_hf(config)) == config
    with pytest.raises(ValueError, match=rf"{config.family}: .*{field}="):
        hf_config.config_to_hf(config.replace(**change))
