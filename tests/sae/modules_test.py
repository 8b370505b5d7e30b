"""Tests for interp.sae.modules: the SAE module, its config and its training initialisation.

The losses and constraints are tested in losses_test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.sae import modules
from interp.sae.modules import SAE, SAEConfig

D, X, B = 16, 64, 8


def _setup(architecture, **overrides):
    config = SAEConfig(architecture=architecture, d_in=D, num_latents=X, k=4, **overrides)
    keys = jax.random.split(jax.random.key(0), 2)
    params = modules.init_params(config, keys[0])
    return config, params, jax.random.normal(keys[1], (B, D))


def test_topk_codes_have_exactly_k_nonzeros_per_row():
    config, params, x = _setup("topk", input_scale=1.3)
    params["b_enc"] = params["b_enc"] + 10.0  # Every pre-activation positive.
    codes = SAE(config).apply({"params": params}, x, method="encode")
    np.testing.assert_array_equal(np.sum(np.asarray(codes) > 0, axis=-1), config.k)


def test_unit_norm_decoder_follows_the_architecture_recipe():
    assert SAEConfig(architecture="topk").normalizes_decoder
    assert not SAEConfig(architecture="relu").normalizes_decoder


def test_activations_of_the_wrong_width_are_a_clear_error():
    config, params, _ = _setup("topk")
    with pytest.raises(ValueError, match=r"reads 16-wide activations but got shape \(2, 8\)"):
        SAE(config).apply({"params": params}, jnp.zeros((2, 8)), method="encode")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(architecture="gated"), r"Unknown SAE architecture 'gated'; expected one of \("),
        (dict(architecture="topk", k=0), r"k=0 must be in 1..num_latents=64"),
        (dict(architecture="matryoshka_batchtopk"), r"needs matryoshka_widths"),
        (dict(architecture="matryoshka_batchtopk", matryoshka_widths=(32, 16, 64)),
         r"must be positive and increasing"),
        (dict(architecture="matryoshka_batchtopk", matryoshka_widths=(16, 32)),
         r"must end at num_latents=64"),
        (dict(architecture="batchtopk", matryoshka_widths=(16, 64)),
         r"matryoshka_widths applies to architecture='matryoshka_batchtopk'"),
    ],
)  # fmt: skip
def test_architecture_settings_are_checked_by_the_architecture(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d_in": D, "num_latents": X, **fields})


def test_matryoshka_widths_from_json_or_a_config_dict_stay_hashable():
    config = SAEConfig.from_dict(
        {"architecture": "matryoshka_batchtopk", "d_in": D, "num_latents": X, "k": 4,
         "matryoshka_widths": [16, 64]}
    )  # fmt: skip
    assert config.matryoshka_widths == (16, 64) and hash(config)
