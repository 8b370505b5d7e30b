"""Generation: the KV cache is exact, padding is invisible, interventions apply every step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.models import generate as generate_lib
from interp.models import hooks
from interp.models.generate import generate, sample_logits, takes_positions, token_positions
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
    if family == "gemma2":
        # Each uncached step compiles anew (a new length): one family, 5 steps (past the
        # window) will do; greedy tokens do not depend on how many follow.
        uncached = generate(model, params, prompt, 5, use_cache=False)
        np.testing.assert_array_equal(cached[:, :10], uncached)
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
    uncached = generate(model, params, prompt, 4, interventions=ablate, use_cache=False)
    np.testing.assert_array_equal(cached[:, :8], uncached)
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
    too_long = r"60 tokens \+ max_new_tokens 10: 70 tokens, more than the 64 positions"
    with pytest.raises(ValueError, match=too_long):
        generate(model, params, jnp.ones((1, 60), jnp.int32), 10)
    with pytest.raises(ValueError, match="learned position embeddings stop there"):
        generate(model, params, jnp.ones((1, 60), jnp.int32), 10, allow_longer=True)
    with pytest.raises(ValueError, match="Unknown hook name"):
        generate(
            model,
            params,
            jnp.ones((1, 2), jnp.int32),
            3,
            interventions={"blocks_0/nope": lambda x: x},
        )


def test_a_rotary_model_past_its_max_len_is_refused_unless_allowed():
    config = ALL["llama"].replace(max_len=8)
    model, params = _model(config)
    prompt = jax.random.randint(jax.random.key(1), (1, 6), 0, config.vocab_size)
    with pytest.raises(ValueError, match=r"A prompt of 6 tokens \+ max_new_tokens 3: 9 tokens, "
                       r"more than the 8 positions .*allow_longer=True"):  # fmt: skip
        generate(model, params, prompt, 3)
    with pytest.raises(ValueError, match="A prompt of 9 tokens"):  # The prompt alone.
        generate(model, params, jnp.ones((1, 9), jnp.int32), 0)
    assert generate(model, params, prompt, 3, allow_longer=True).shape == (1, 9)


# ----------------------------------------------------------------- what interventions see

STEER = 10.0  # Large enough to change greedy tokens of the scaled-up random models.


def _plain_loop(model, params, prompt, mask, steps, site, fn):
    """Greedy decoding as a user would write it: re-run the growing sequence every step."""
    sequence, mask = jnp.asarray(prompt), jnp.asarray(mask, jnp.int32)
    for _ in range(steps):
        positions = token_positions(mask)
        bound = functools.partial(fn, positions=positions) if takes_positions(fn) else fn
        logits, _ = hooks.run_with_hooks(
            model, params, sequence, interventions={site: bound}, attention_mask=mask
        )
        last = jnp.argmax(logits[jnp.arange(len(sequence)), _last_real(mask)], -1)
        sequence = jnp.concatenate([sequence, last[:, None].astype(sequence.dtype)], 1)
        mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1)
    return sequence


def _last_real(mask):
    return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def _padded_batch(side):
    """Two prompts of 3 and 5 real tokens in [2, 5], padded on `side`, and their mask."""
    short, long = [5, 17, 3], [9, 2, 44, 61, 7]
    if side == "none":
        return jnp.array([[5, 17, 3, 8, 1], long], jnp.int32), jnp.ones((2, 5), jnp.int32)
    row = [0, 0, *short] if side == "left" else [*short, 0, 0]
    mask = [[0, 0, 1, 1, 1] if side == "left" else [1, 1, 1, 0, 0], [1] * 5]
    return jnp.array([row, long], jnp.int32), jnp.array(mask, jnp.int32)


def _direction(config):
    return 2.0 * jax.random.normal(jax.random.key(11), (config.d_model,))


# Built once so the compiled programs are reused across parameters.
_V = _direction(GPT2_LIKE)
POSITION_INDEXED = {
    "last_column": lambda x: x.at[:, -1].add(STEER * _V),
    "position_2": lambda x, positions: jnp.where((positions == 2)[..., None], x + STEER * _V, x),
    "positions_2_to_5": lambda x, positions: jnp.where(
        ((positions >= 2) & (positions <= 5))[..., None], x + STEER * _V, x
    ),
}
# Position-independent interventions (x + v, ablations): test_cache_and_no_cache_agree_*.
SITE = "blocks_0/resid_post"


@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(POSITION_INDEXED))
def test_interventions_see_the_full_forward_pass(name, side):
    # The case: without the cache, x[:, -1] used to land on an unwritten future slot
    # of a fixed buffer and change nothing. Now each uncached step is the plain loop's pass.
    model, params = _model(GPT2_LIKE)
    prompt, mask = _padded_batch(side)
    fn = POSITION_INDEXED[name]
    run = functools.partial(
        generate, model, params, prompt, 3, attention_mask=mask, use_cache=False
    )
    uncached = run(interventions={SITE: fn})
    np.testing.assert_array_equal(uncached, _plain_loop(model, params, prompt, mask, 3, SITE, fn))
    assert not np.array_equal(uncached, run()), "The intervention changed nothing."
    if name != "last_column":
        # Length-independent interventions (position-independent, or selecting through
        # `positions`) change each position as the full pass does: the cache agrees.
        np.testing.assert_array_equal(uncached, run(interventions={SITE: fn}, use_cache=True))


# The first position a cached x.at[:, -1] reaches in each row: the prompt's last column (a
# padding column for the short row under right padding, so its next position), then every
# new token.
FIRST_INTERVENED = {"none": [4, 4], "left": [2, 4], "right": [3, 4]}


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_cached_last_column_is_the_newest_token(side):
    # At a cached step x is [B, 1, D]: x[:, -1] is the newest token, the full pass's last
    # column. At the last site nothing attends back, so the cache and the loop agree.
    model, params = _model(GPT2_LIKE)
    prompt, mask = _padded_batch(side)
    fn = POSITION_INDEXED["last_column"]
    run = functools.partial(generate, model, params, prompt, 3, attention_mask=mask)
    cached = run(interventions={"final_norm": fn})
    np.testing.assert_array_equal(
        cached, _plain_loop(model, params, prompt, mask, 3, "final_norm", fn)
    )
    # At an earlier site the cache keeps each token's intervened keys and values, where a
    # full pass intervenes on the last column only: the cached path is then the full pass
    # intervening on every position from the prompt's last on (documented in generate).
    cached = run(interventions={SITE: fn})
    first = jnp.array(FIRST_INTERVENED[side])[:, None]
    from_last = lambda x, positions: jnp.where(  # noqa: E731
        (positions >= first)[..., None], x + STEER * _V, x
    )
    np.testing.assert_array_equal(
        cached, _plain_loop(model, params, prompt, mask, 3, SITE, from_last)
    )


def test_cached_step_sees_one_position_and_its_absolute_position():
    model, params = _model(GPT2_LIKE)
    prompt, mask = _padded_batch("left")
    seen = []

    def record(x, positions):
        jax.debug.callback(lambda s, p: seen.append((s, np.asarray(p))), x.shape[1], positions)
        return x

    generate(model, params, prompt, 3, attention_mask=mask, interventions={"final_norm": record})
    jax.effects_barrier()
    assert [s for s, _ in seen] == [5, 1, 1, 1]
    np.testing.assert_array_equal(seen[0][1], [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    for step, (_, positions) in enumerate(seen[1:]):
        np.testing.assert_array_equal(positions, [[3 + step], [5 + step]])


def test_return_mask_tells_eos_from_padding_when_they_share_an_id():
    model, params = _model(GPT2_LIKE)
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    free = np.asarray(generate(model, params, prompt, 6))[0]
    stop_at = next(i for i in range(4, 9) if free[i] not in free[3:i])
    eos = int(free[stop_at])
    tokens, mask = generate(model, params, prompt, 6, eos_id=eos, pad_id=eos, return_mask=True)
    np.testing.assert_array_equal(tokens[0, stop_at:], eos)  # Eos, then filler equal to it.
    np.testing.assert_array_equal(mask[0], [1] * (stop_at + 1) + [0] * (8 - stop_at))
    _, mask = generate(model, params, prompt, 6, return_mask=True)
    np.testing.assert_array_equal(mask, 1)


def test_each_shape_compiles_once():
    model, params = _model(GPT2_LIKE)
    prompt, mask = _padded_batch("left")
    steer = {SITE: POSITION_INDEXED["position_2"]}
    for use_cache in (True, False):
        run = functools.partial(
            generate, model, params, prompt, 3, attention_mask=mask, use_cache=use_cache
        )
        run(interventions=steer)
        sizes = (
            generate_lib._generate_cached._cache_size(),
            generate_lib._full_pass_step._cache_size(),
        )
        run(interventions=steer)
        run(interventions=dict(steer))  # Equal mappings of the same functions: no new program.
        assert sizes == (
            generate_lib._generate_cached._cache_size(),
            generate_lib._full_pass_step._cache_size(),
        )


def _add_scaled(direction, scale, x):
    return x + scale * direction


def test_array_leaves_of_pytree_interventions_are_traced():
    # A Partial's array arguments are traced: new coefficients reuse the compiled program;
    # its Python function and Python numbers stay static, and plain functions work as before.
    model, params = _model(GPT2_LIKE)
    prompt, mask = _padded_batch("left")
    run = functools.partial(generate, model, params, prompt, 3, attention_mask=mask)
    steer = lambda s: {SITE: jax.tree_util.Partial(_add_scaled, _V, jnp.float32(s))}  # noqa: E731
    first = run(interventions=steer(0.0))
    size = generate_lib._generate_cached._cache_size()
    outputs = [run(interventions=steer(s)) for s in (STEER, 2 * STEER)]
    assert generate_lib._generate_cached._cache_size() == size
    np.testing.assert_array_equal(first, run())
    plain = lambda x: x + STEER * _V  # noqa: E731
    np.testing.assert_array_equal(outputs[0], run(interventions={SITE: plain}))
    assert not np.array_equal(outputs[0], first)
