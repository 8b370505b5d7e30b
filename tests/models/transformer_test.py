"""The decoder's own contract: clear errors on malformed inputs, one hook vocabulary."""

import jax.numpy as jnp
import pytest

from interp.models import hooks
from interp.models.transformer import Transformer, init_params
from tests.models.testing import GEMMA2_LIKE, GEMMA3_LIKE, GPT2_LIKE, LLAMA_LIKE, QWEN3_LIKE


def test_bad_model_inputs_are_clear_errors():
    model, params = Transformer(GPT2_LIKE), init_params(GPT2_LIKE)
    tokens = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"add a batch axis"):
        model.apply({"params": params}, tokens[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.apply({"params": params}, tokens, attention_mask=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="learned positions"):
        model.apply({"params": params}, jnp.zeros((1, GPT2_LIKE.max_len + 1), jnp.int32))


@pytest.mark.parametrize("config", [GEMMA2_LIKE, GEMMA3_LIKE, QWEN3_LIKE])
def test_llama_like_families_share_hook_names(config):
    """Same sites as Llama; q/k norms add attn/{q,k}_pre_norm, and each extra norm its
    `normalized` point, only where a family has them."""
    names = set(hooks.hook_names(Transformer(config)))
    expected = set(hooks.hook_names(Transformer(LLAMA_LIKE.replace(num_layers=config.num_layers))))
    for i in range(config.num_layers):
        if config.qk_norm:
            expected |= {f"blocks_{i}/attn/q_pre_norm", f"blocks_{i}/attn/k_pre_norm"}
            expected |= {f"blocks_{i}/attn/q_norm/normalized", f"blocks_{i}/attn/k_norm/normalized"}
        if config.post_norms:
            expected |= {f"blocks_{i}/post_attn_norm/normalized"}
            expected |= {f"blocks_{i}/post_mlp_norm/normalized"}
    assert names == expected
