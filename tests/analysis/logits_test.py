"""Logit effects against a hand computation and against the model itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import analysis
from interp.models import hooks
from interp.models.transformer import Transformer, init_params
from interp.sae.modules import SAE, SAEConfig
from tests.models.testing import GEMMA3_LIKE, GPT2_LIKE, LLAMA_LIKE

CONFIGS = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE, "gemma3": GEMMA3_LIKE}
NUM_LATENTS = 6


def _model(name):
    """A model whose final norm has a nontrivial learned scale (and bias)."""
    config = CONFIGS[name]
    params = init_params(config, seed=0)
    rng = np.random.default_rng(1)
    ln_f = {key: jnp.asarray(rng.normal(size=value.shape), jnp.float32)
            for key, value in params["ln_f"].items()}  # fmt: skip
    return Transformer(config), dict(params, ln_f=ln_f)


def _w_dec(config):
    return np.random.default_rng(2).normal(size=(NUM_LATENTS, config.d_model)).astype(np.float32)


def _by_hand(config, params, direction):
    """One feature's effect on every token, written out elementwise."""
    d = [float(v) for v in direction]
    if config.norm == "layernorm":
        mean = sum(d) / len(d)
        d = [v - mean for v in d]
    scale = np.asarray(params["ln_f"]["scale"], np.float64)
    if config.tied_embeddings:
        unembed = np.asarray(params["embed"], np.float64).T
    else:
        unembed = np.asarray(params["lm_head"], np.float64)
    out = []
    for v in range(config.vocab_size):
        out.append(
            sum(d[i] * (config.norm_offset + scale[i]) * unembed[i, v] for i in range(len(d)))
        )
    return np.array(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logit_effects_equal_a_hand_computation(name):
    model, params = _model(name)
    config = model.config
    w_dec = _w_dec(config)
    got = analysis.logit_effects(model, params, {"W_dec": w_dec}, [4, 1], k=5)
    np.testing.assert_array_equal(got.features, [4, 1])
    for row, feature in enumerate([4, 1]):
        effect = _by_hand(config, params, w_dec[feature])
        order = np.argsort(-effect)
        np.testing.assert_array_equal(got.top_tokens[row], order[:5])
        np.testing.assert_array_equal(got.bottom_tokens[row], order[::-1][:5])
        np.testing.assert_allclose(got.top_values[row], effect[order[:5]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.bottom_values[row], effect[order[::-1][:5]], rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logit_effects_are_what_the_model_does_with_the_direction(name):
    """With the last residual stream replaced by d, the logits (less those of a zero residual,
    which leaves the norm's bias) times d's RMS (about its mean for LayerNorm) are the
    effects: the model's own final norm and unembedding, no restated formula."""
    model, params = _model(name)
    config = model.config
    w_dec = _w_dec(config)
    got = analysis.logit_effects(model, params, {"W_dec": w_dec}, k=config.vocab_size)
    last = f"blocks_{config.num_layers - 1}/resid_post"
    tokens = jnp.zeros((1, 3), jnp.int32)

    @jax.jit
    def logits_with(direction):
        fill = {last: lambda value: jnp.broadcast_to(direction, value.shape).astype(value.dtype)}
        return hooks.run_with_hooks(model, params, tokens, interventions=fill)[0][0, -1]

    zero = logits_with(jnp.zeros(config.d_model))
    for feature in range(NUM_LATENTS):
        d = w_dec[feature].astype(np.float64)
        if config.norm == "layernorm":
            d = d - d.mean()
        rms = np.sqrt(np.mean(d * d) + config.norm_eps)
        model_effect = (np.asarray(logits_with(jnp.asarray(w_dec[feature]))) - zero) * rms
        effect = np.empty(config.vocab_size)
        effect[got.top_tokens[feature]] = got.top_values[feature]
        np.testing.assert_allclose(effect, model_effect, rtol=2e-3, atol=2e-4)


def test_sites_and_bad_input():
    model, params = _model("gpt2")
    config = model.config
    w_dec = _w_dec(config)
    # At final_norm a direction goes straight to the unembedding (tied: embed^T).
    got = analysis.logit_effects(model, params, {"W_dec": w_dec}, 0, k=3, site="final_norm")
    effect = w_dec[0] @ np.asarray(params["embed"]).T
    np.testing.assert_allclose(got.top_values[0], np.sort(effect)[::-1][:3], rtol=1e-5)
    # The SAE's input scale divides its decoder rows, as `decode` does.
    sae_config = SAEConfig(architecture="relu", d_in=config.d_model, num_latents=NUM_LATENTS,
                           input_scale=4.0, hook_name="blocks.1.hook_resid_post")  # fmt: skip
    sae = SAE(sae_config)
    scaled = analysis.logit_effects(model, params, {"W_dec": w_dec}, 2, sae=sae)
    plain = analysis.logit_effects(model, params, {"W_dec": w_dec}, 2)
    np.testing.assert_allclose(scaled.top_values, plain.top_values / 4, rtol=1e-6)
    # More features than one chunk (256): the last chunk is padded and cut back.
    many = np.random.default_rng(4).normal(size=(300, config.d_model)).astype(np.float32)
    got = analysis.logit_effects(model, params, {"W_dec": many}, k=2)
    want = np.stack([_by_hand(config, params, many[f]) for f in (0, 299)])
    np.testing.assert_array_equal(got.top_tokens[[0, 299]], np.argsort(-want, 1)[:, :2])
    np.testing.assert_array_equal(got.bottom_tokens[[0, 299]], np.argsort(want, 1)[:, :2])
    assert got.top_tokens.shape == (300, 2)
    with pytest.raises(ValueError, match="Feature 6 is outside this SAE.*0..5"):
        analysis.logit_effects(model, params, {"W_dec": w_dec}, [0, 6])
    with pytest.raises(ValueError, match="Feature -1 is outside"):
        analysis.logit_effects(model, params, {"W_dec": w_dec}, -1)
    with pytest.raises(ValueError, match="16-wide.*residual stream is 32"):
        analysis.logit_effects(model, params, {"W_dec": w_dec[:, :16]})
    with pytest.raises(ValueError, match="output projection"):
        analysis.logit_effects(model, params, {"W_dec": w_dec}, site="blocks_0/attn/z")


def test_an_sae_at_another_site_than_the_one_it_writes_is_refused():
    model, params = _model("gpt2")
    w_dec = _w_dec(model.config)
    sae = SAE(SAEConfig(architecture="relu", d_in=model.config.d_model, num_latents=NUM_LATENTS,
                        hook_name="blocks.1.hook_resid_post"))  # fmt: skip
    with pytest.raises(ValueError, match="trained on 'blocks.1.hook_resid_post'.*used at "
                       "'blocks_0/resid_post'"):  # fmt: skip
        analysis.logit_effects(model, params, {"W_dec": w_dec}, 0, sae=sae,
                               site="blocks_0/resid_post")  # fmt: skip
    own = analysis.logit_effects(model, params, {"W_dec": w_dec}, 0, sae=sae,
                                 site="blocks_1/resid_post")  # fmt: skip
    other = analysis.logit_effects(model, params, {"W_dec": w_dec}, 0, sae=sae,
                                   site="blocks_0/resid_post", allow_other_site=True)  # fmt: skip
    np.testing.assert_array_equal(own.top_tokens, other.top_tokens)  # The same stream.
