"""Tests for interp.models.hf_config: both config.json layouts, and what a family cannot express.

That the configs give transformers' logits is checked with the parameters, in hf_params_test.
"""

import pytest

from interp.models import hf_config
from interp.models.config import ModelConfig
from tests.models import hf_testing


def test_unknown_model_type_or_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"(?s)'mamba'.*gpt2.*gpt_neox.*llama.*gemma2"):
        hf_config.config_from_hf({"model_type": "mamba"})
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
