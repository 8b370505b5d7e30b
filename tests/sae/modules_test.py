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
