"""The decoder's own contract: clear errors on malformed inputs."""

import jax.numpy as jnp
import pytest

from interp.models.transformer import Transformer, init_params
from tests.models.testing import GPT2_LIKE


def test_bad_model_inputs_are_clear_errors():
    model, params = Transformer(GPT2_LIKE), init_params(GPT2_LIKE)
    tokens = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"add a batch axis"):
        model.apply({"params": params}, tokens[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.apply({"params": params}, tokens, attention_mask=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="learned positions"):
        model.apply({"params": params}, jnp.zeros((1, GPT2_LIKE.max_len + 1), jnp.int32))
