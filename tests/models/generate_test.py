"""Generation: the KV cache is exact, padding is invisible, interventions apply every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.models.generate import generate, sample_logits
from interp.models.transformer import Transformer, init_params
from tests.models.testing import ALL, GEMMA2_LIKE, GPT2_LIKE


def _model(config, seed=0):
    # Scaled-up random weights: at the default init scale every prompt continues with the
    # same few tokens, which would let broken generation pass.
    params = jax.tree.map(lambda p: 8.0 * p, init_params(config, seed=seed))
    return Transformer(config), params


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "neox", "gemma3"])
def test_greedy_with_cache_equals_greedy_without(family):
    # Gemma 2/3's window (4) is shorter than prompt + generation, so the sliding mask matters;
    # the gemma3 config also has q/k norms, two rotaries (YaRN globally) and one kv head.
    model, params = _model(ALL[family])
    prompt = jax.random.randint(jax.random.key(1), (3, 5), 0, model.config.vocab_size)
    cached = generate(model, params, prompt, 8)
    uncached = generate(model, params, prompt, 8, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached[:, :5], prompt)
    # Greedy means each new token is the argmax of a full forward pass on what precedes it.
    logits = model.apply({"params": params}, cached[:, :-1])
    np.testing.assert_array_equal(cached[:, 5:], np.argmax(logits[:, 4:], -1))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_generate_what_they_would_alone(side):
    model, params = _model(GEMMA2_LIKE)
    short = jnp.array([5, 17, 3], jnp.int32)
    long = jnp.array([9, 2, 44, 61, 7], jnp.int32)
    pad = jnp.zeros(2, jnp.int32)
    padded = jnp.concatenate([pad, short]) if side == "left" else jnp.concatenate([short, pad])
    mask = (jnp.arange(5) >= 2) if side == "left" else (jnp.arange(5) < 3)
    batch = generate(
        model,
        params,
        jnp.stack([padded, long]),
        6,
        attention_mask=jnp.stack([mask, jnp.ones(5, bool)]).astype(jnp.int32),
    )
    alone_short = generate(model, params, short[None], 6)
    alone_long = generate(model, params, long[None], 6)
    np.testing.assert_array_equal(batch[0, 5:], alone_short[0, 3:])
    np.testing.assert_array_equal(batch[1], alone_long[0])


def test_intervention_applies_at_every_generated_step():
    model, params = _model(GPT2_LIKE)
    target = 42
    # Tied embeddings: adding a large multiple of the target's embedding to the final norm
    # output makes the target the argmax, but only if the intervention runs at that step.
    push = {"final_norm": lambda x: x + 100.0 * params["embed"][target]}
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    steered = generate(model, params, prompt, 7, interventions=push)
    np.testing.assert_array_equal(steered[0, 3:], target)
    assert not np.all(generate(model, params, prompt, 7)[0, 3:] == target)


def test_cache_and_no_cache_agree_under_an_intervention():
    model, params = _model(GPT2_LIKE)
    ablate = {"blocks_1/mlp/out": jnp.zeros_like, "blocks_0/attn/z": lambda z: 0.5 * z}
    prompt = jax.random.randint(jax.random.key(3), (2, 4), 0, GPT2_LIKE.vocab_size)
    cached = generate(model, params, prompt, 6, interventions=ablate)
    uncached = generate(model, params, prompt, 6, interventions=ablate, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    assert not np.array_equal(cached, generate(model, params, prompt, 6))


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model, params = _model(GPT2_LIKE)
    prompt = jnp.array([[4, 8, 15]], jnp.int32)
    key = jax.random.key(7)
    a = generate(model, params, prompt, 10, temperature=1.0, rng=key)
    b = generate(model, params, prompt, 10, temperature=1.0, rng=key)
    np.testing.assert_array_equal(a, b)
    top1 = generate(model, params, prompt, 10, temperature=1.0, top_k=1, rng=key)
    np.testing.assert_array_equal(top1, generate(model, params, prompt, 10))


def test_sampling_follows_the_distribution():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1, 0.0]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1, 0.0], atol=0.03)
    nucleus = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.75))(keys)
    assert set(np.unique(np.asarray(nucleus))) == {0, 1}


def test_rows_stop_after_eos():
    model, params = _model(GPT2_LIKE)
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    free = np.asarray(generate(model, params, prompt, 6))[0]
    # The first generated token that differs from its predecessors becomes the stop token.
    stop_at = next(i for i in range(4, 9) if free[i] not in free[3:i])
    stopped = generate(model, params, prompt, 6, eos_id=int(free[stop_at]), pad_id=0)
    np.testing.assert_array_equal(stopped[0, : stop_at + 1], free[: stop_at + 1])
    np.testing.assert_array_equal(stopped[0, stop_at + 1 :], 0)


def test_bad_arguments_are_clear_errors():
    model, params = _model(GPT2_LIKE)
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, params, jnp.ones((1, 2), jnp.int32), 3, temperature=1.0)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        generate(model, params, jnp.ones((1, 60), jnp.int32), 10)
    with pytest.raises(ValueError, match="Unknown hook name"):
        generate(
            model,
            params,
            jnp.ones((1, 2), jnp.int32),
            3,
            interventions={"blocks_0/nope": lambda x: x},
        )
