"""Tests for interp.models.hf_rope: rope types and their keys read as transformers reads them.

That the model then rotates as transformers does is checked on logits in hf_params_test (and
each scaling parameter's control there).
"""

import math

import pytest

from interp.models import hf_config, hf_rope
from tests.models import hf_testing


def _llama(**rope):
    hf = hf_testing.hf_config("llama_mha_bias_tied").to_dict()
    return dict(hf, rope_parameters=None, rope_scaling=rope, rope_theta=10_000.0)


def test_rope_scaling_types_read_as_transformers_reads_them():
    linear = hf_config.config_from_hf(_llama(rope_type="linear", factor=2))
    assert (linear.rope_scaling, linear.rope_factor) == ("linear", 2.0)
    dynamic = hf_config.config_from_hf(_llama(type="dynamic", factor=3))
    assert (dynamic.rope_scaling, dynamic.rope_factor, dynamic.max_len) == ("dynamic", 3.0, 64)
    # YaRN: defaults beta 32/1, truncate; no factor means max / original length.
    yarn = hf_config.config_from_hf(_llama(rope_type="yarn", original_max_position_embeddings=16))
    assert (yarn.rope_factor, yarn.rope_original_max_len) == (4.0, 16)
    assert (yarn.rope_beta_fast, yarn.rope_beta_slow, yarn.rope_truncate) == (32, 1, True)
    assert yarn.rope_attention_factor is None  # 0.1 ln(factor) + 1, computed by the model
    # DeepSeek's mscale / mscale_all_dim become the attention factor they imply.
    yarn = hf_config.config_from_hf(
        _llama(
            rope_type="yarn",
            factor=4,
            original_max_position_embeddings=16,
            mscale=0.5,
            mscale_all_dim=1.0,
            truncate=False,
        )
    )
    expected = (0.05 * math.log(4) + 1) / (0.1 * math.log(4) + 1)
    assert math.isclose(yarn.rope_attention_factor, expected) and not yarn.rope_truncate
    for config in (linear, dynamic, yarn):
        assert hf_config.config_from_hf(hf_config.config_to_hf(config)) == config


def test_unknown_rope_types_and_keys_are_named():
    with pytest.raises(ValueError, match=r"'longrope'.*supported: default, linear, dyn"):
        hf_config.config_from_hf(_llama(rope_type="longrope", factor=2.0))
    with pytest.raises(ValueError, match=r"linear rope parameter\(s\) \['low_freq_factor'\]"):
        hf_config.config_from_hf(_llama(rope_type="linear", factor=2.0, low_freq_factor=1.0))
    assert hf_rope.ROPE_TYPES == ("default", "linear", "dynamic", "yarn", "llama3")
