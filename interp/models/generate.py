"""Autoregressive generation with a KV cache, greedy or sampled, with hook interventions.

    tokens = generate(model, params, prompt, max_new_tokens=20)                   # greedy
    tokens = generate(model, params, prompt, 20, temperature=0.8, top_p=0.9, rng=key)
    tokens = generate(model, params, prompt, 20,
                      interventions={"blocks_3/resid_post": lambda x: x + 4.0 * direction})
    # Position-aware: the second argument is each column's position (see `token_positions`).
    at_three = lambda x, positions: jnp.where((positions == 3)[..., None], x + v, x)

Batched prompts may be padded on either side (pass `attention_mask`); each row continues from
its own last real token, and positions count real tokens only, so a padded row generates
exactly what it would alone.

What an intervention sees. With `use_cache=False` every step is a full forward pass over the
current sequence, exactly as a plain loop would run it: the prompt (with its padding) followed
by the tokens generated so far, [B, T + i, ...] at step i, so `x[:, -1]` is the newest token
and `x[:, p]` is column p. With the KV cache (the default), the prompt's prefill sees
[B, T, ...] and each generated token's step sees only that token, [B, 1, ...]; the keys and
values of earlier tokens come from the cache, computed (and intervened on) at their own step.
The two agree whenever an intervention changes the value at a position the same way whatever
the sequence length: position-independent ones (`x + v`, ablations) and ones that select
positions through the `positions` argument. They differ, by design, for interventions that
address columns relative to the current length: `x.at[:, -1]` at a cached step is the newest
token, as in the full pass, but in the full pass earlier tokens are no longer the last column
and go un-intervened, while the cache keeps their intervened keys and values. So cached,
`x.at[:, -1]` acts as the full pass would with every position from the prompt's last column
on intervened (`positions >= that position`); at a site nothing attends back from (e.g.
`final_norm`) both are the same. Under right padding the prompt's last column is padding for
short rows, in both paths. Column indices from the start (`x[:, p]`) do not exist at a cached
step (its length is 1): select positions with `positions` instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interp.models import hooks
from interp.models.transformer import init_cache

# fn(value) -> value, or fn(value, positions) -> value; see `token_positions`.
Intervention = Callable[..., jax.Array]


def sample_logits(logits, rng, *, temperature=0.0, top_k=None, top_p=None):
    """Picks next tokens from float logits [B, V]: argmax at temperature 0, else samples."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        # Nucleus: keep the smallest set of tokens whose probability reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def token_positions(attention_mask, offset=0):
    """Each column's position in its row, as the model counts it, and -1 at padding.

    This is the `positions` argument that `generate` gives two-argument interventions: the
    number of real tokens before the column in its row (so left or right padding does not
    shift it, and a padded row sees the positions it would see alone), or -1 where the mask is
    0. With the same mask, `run_with_hooks` plus `lambda x: fn(x, token_positions(mask))` runs
    an intervention as `generate` does.

    Args:
      attention_mask: [B, T], 1 at real tokens.
      offset: [B, 1] or scalar, real tokens before column 0 (those already in a KV cache).

    Returns:
      int32 [B, T].
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.where(mask > 0, offset + jnp.cumsum(mask, axis=1) - 1, -1).astype(jnp.int32)


def takes_positions(fn: Intervention) -> bool:
    """Whether `generate` calls `fn` as fn(value, positions): it has two required arguments."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # Some builtins have no signature: one argument.
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def _split(interventions):
    """(hashable structure, array leaves) of {name: fn}; see `generate`'s interventions."""
    if not interventions:
        return None, ()
    leaves, treedef = jax.tree.flatten(tuple(sorted(interventions.items())))
    # None never is a leaf of a flattened tree, so it marks the traced slots.
    static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    return (treedef, static), tuple(leaf for leaf in leaves if _is_array(leaf))


def _join(structure, arrays):
    """The ((name, fn), ...) that `_split` took apart, with `arrays` (traced) in place."""
    if structure is None:
        return None
    treedef, static = structure
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if s is None else s for s in static])


def _bind(interventions, positions):
    """{name: fn(value)}: two-argument interventions get `positions` [B, T]."""
    if not interventions:
        return None
    return {
        name: (lambda x, fn=fn: fn(x, positions)) if takes_positions(fn) else fn
        for name, fn in interventions
    }


def _last_real(mask):
    """Index of each row's last real token. mask: [B, T]."""
    t = mask.shape[1]
    return t - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def _finish(token, done, *, eos_id, pad_id):
    """Rows already done emit `pad_id`; a row is done once it has emitted `eos_id`."""
    if eos_id is None:
        return token, done
    token = jnp.where(done, pad_id, token)
    return token, done | (token == eos_id)


_SAMPLING = ("temperature", "top_k", "top_p", "eos_id", "pad_id")


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "interventions", *_SAMPLING)
)
def _generate_cached(
    model, params, prompt, mask, keys, arrays, *, max_new_tokens, interventions, **sampling
):
    b, t = prompt.shape
    interventions = _join(interventions, arrays)
    pick = functools.partial(
        sample_logits, **{k: sampling[k] for k in ("temperature", "top_k", "top_p")}
    )
    finish = functools.partial(_finish, eos_id=sampling["eos_id"], pad_id=sampling["pad_id"])

    def apply(tokens, token_mask, cache, positions):
        with hooks.hooked(model, interventions=_bind(interventions, positions)):
            return model.apply({"params": params}, tokens, attention_mask=token_mask, cache=cache)

    cache = init_cache(model.config, b, t + max_new_tokens)
    logits, cache = apply(prompt, mask, cache, token_positions(mask))
    last = logits[jnp.arange(b), _last_real(mask)]
    length = mask.sum(axis=1, keepdims=True)  # [B, 1] real tokens so far.

    def step(carry, key):
        cache, last, done, length = carry
        token, done = finish(pick(last, key), done)
        # The new token's position is the count of real tokens before it.
        logits, cache = apply(token[:, None], jnp.ones((b, 1), jnp.int32), cache, length)
        return (cache, logits[:, 0], done, length + 1), token

    _, new = jax.lax.scan(step, (cache, last, jnp.zeros(b, bool), length), keys)
    return new.T


@functools.partial(jax.jit, static_argnames=("model", "interventions", *_SAMPLING))
def _full_pass_step(model, params, sequence, mask, done, key, arrays, *, interventions, **sampling):
    """One uncached step: a full forward pass over `sequence` [B, S]; returns (token, done)."""
    interventions = _join(interventions, arrays)
    with hooks.hooked(model, interventions=_bind(interventions, token_positions(mask))):
        logits = model.apply({"params": params}, sequence, attention_mask=mask)
    last = logits[jnp.arange(sequence.shape[0]), _last_real(mask)]
    token = sample_logits(last, key, **{k: sampling[k] for k in ("temperature", "top_k", "top_p")})
    return _finish(token, done, eos_id=sampling["eos_id"], pad_id=sampling["pad_id"])


def _generate_uncached(model, params, prompt, mask, keys, arrays, *, max_new_tokens, **kwargs):
    # A plain loop over the growing sequence: every step is exactly the forward pass a user
    # would run on it (compiled once per sequence length, then reused across calls).
    sequence, done, new = prompt, jnp.zeros(prompt.shape[0], bool), []
    for i in range(max_new_tokens):
        token, done = _full_pass_step(
            model, params, sequence, mask, done, keys[i], arrays, **kwargs
        )
        new.append(token)
        sequence = jnp.concatenate([sequence, token[:, None].astype(sequence.dtype)], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
    return jnp.stack(new, axis=1) if new else jnp.zeros((prompt.shape[0], 0), jnp.int32)


def generate(
    model: nn.Module,
    params,
    prompt,
    max_new_tokens: int,
    *,
    attention_mask=None,
    rng=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    interventions: Mapping[str, Intervention] | None = None,
    use_cache: bool = True,
    return_mask: bool = False,
    allow_longer: bool = False,
):
    """Generates `max_new_tokens` tokens after each prompt.

    Args:
      model: A `Transformer`.
      params: Its parameters.
      prompt: [B, T] int token ids; padded rows need `attention_mask`.
      max_new_tokens: Number of tokens to add.
      attention_mask: [B, T], 1 for real prompt tokens. Never derived from the ids: a pad id
        may also be a real token (eos, or id 0).
      rng: PRNG key, needed when temperature > 0.
      temperature: 0 for greedy decoding.
      top_k, top_p: Optional truncation of the sampling distribution.
      eos_id: Once a row emits it, the row continues with `pad_id`.
      pad_id: Filler after eos (may equal eos_id; `return_mask` tells them apart).
      interventions: {hook name or pattern: fn}, applied at every forward pass (the prefill
        and each step). fn(value) -> value, or fn(value, positions) -> value when fn has two
        required arguments: `positions` is int32 [B, S] for a value [B, S, ...], each column's
        position in its row counting real tokens only, -1 at padding (`token_positions`). At
        a cached step S is 1 and positions[:, 0] is the new token's position. See the module
        docstring for what each path shows an intervention. An intervention may be a pytree
        (`jax.tree_util.Partial`, a `flax.struct.dataclass` with `__call__`, such as
        `interp.steering.feature_intervention`'s): its array leaves (jax or NumPy arrays and
        NumPy scalars) are traced arguments, the rest (functions, Python numbers, strings)
        is static. Compiled programs are cached per static structure, functions compared by
        identity: reuse the same functions and pass changing coefficients as arrays (e.g.
        `Partial(add, jnp.float32(s))`) to avoid recompiling.
      use_cache: False runs a full forward pass over the current sequence at every step (a
        slow reference, compiled once per sequence length); interventions then see exactly
        what `run_with_hooks` on that sequence would.
      return_mask: Also return the mask of real tokens: the prompt's mask, then 1 for each
        generated token up to and including the row's first `eos_id`, 0 after.
      allow_longer: Let a rotary model run past its `max_len` (the prompt's length plus
        `max_new_tokens`), e.g. one whose rope scaling is meant to stretch its context
        (dynamic NTK grows its base with the length). By default that is an error naming
        both lengths, as it always is for learned positions.

    Returns:
      [B, T + max_new_tokens] token ids: the prompts followed by the generated tokens; with
      `return_mask`, (tokens, mask), both [B, T + max_new_tokens].

    Raises:
      ValueError: for T + max_new_tokens past the model's max_len (see `allow_longer`), a
        prompt that is not [B, T], sampling without rng, a mask of another shape, or an
        unknown hook name.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}.")
    if temperature > 0 and rng is None:
        raise ValueError("Sampling (temperature > 0) needs rng=jax.random.key(seed).")
    mask = jnp.ones_like(prompt) if attention_mask is None else jnp.asarray(attention_mask)
    mask = mask.astype(jnp.int32)
    if mask.shape != prompt.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match prompt {prompt.shape}.")
    model.config.check_length(  # Columns, padding included: what the cache holds.
        prompt.shape[1] + max_new_tokens,
        f"A prompt of {prompt.shape[1]} tokens + max_new_tokens {max_new_tokens}",
        allow_longer=allow_longer,
        option="allow_longer",
    )
    if interventions:
        hooks.resolve(model, list(interventions))  # Fail early, outside the trace.
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
    run = _generate_cached if use_cache else _generate_uncached
    # Static structure (functions compare by identity) and traced array leaves.
    structure, arrays = _split(interventions)
    new = run(
        model,
        params,
        prompt,
        mask,
        keys,
        arrays,
        max_new_tokens=max_new_tokens,
        interventions=structure,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    tokens = jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)
    if not return_mask:
        return tokens
    if eos_id is None:
        generated = jnp.ones_like(new, jnp.int32)
    else:
        # Real up to and including the first eos: no eos strictly before. Filler after it
        # may equal eos_id; only the first one counts, so that does not matter.
        emitted = jnp.cumsum(new == eos_id, axis=1)
        generated = (emitted - (new == eos_id) == 0).astype(jnp.int32)
    return tokens, jnp.concatenate([mask, generated], axis=1)
