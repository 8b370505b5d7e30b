"""Autoregressive generation with a KV cache, greedy or sampled, with hook interventions.

    tokens = generate(model, params, prompt, max_new_tokens=20)                   # greedy
    tokens = generate(model, params, prompt, 20, temperature=0.8, top_p=0.9, rng=key)
    tokens = generate(model, params, prompt, 20,
                      interventions={"blocks_3/resid_post": lambda x: x + 4.0 * direction})

Interventions apply at every forward pass: the prompt's prefill and each generated token.
Batched prompts may be padded on either side (pass `attention_mask`); each row continues from
its own last real token, and positions count real tokens only, so a padded row generates
exactly what it would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from interp.models import hooks
from interp.models.transformer import init_cache


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


def _last_real(mask):
    """Index of each row's last real token. mask: [B, T]."""
    t = mask.shape[1]
    return t - 1 - jnp.argmax(mask[:, ::-1], axis=1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
        "pad_id",
        "use_cache",
        "interventions",
    ),
)
def _generate(
    model,
    params,
    prompt,
    mask,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos_id,
    pad_id,
    use_cache,
    interventions,
):
    b, t = prompt.shape
    total = t + max_new_tokens
    pick = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    interventions = dict(interventions) if interventions else None

    def apply(tokens, **kwargs):
        with hooks.hooked(model, interventions=interventions):
            return model.apply({"params": params}, tokens, **kwargs)

    rows = jnp.arange(b)
    keys = jax.random.split(rng, max_new_tokens)

    def finish(token, done):
        if eos_id is None:
            return token, done
        token = jnp.where(done, pad_id, token)
        return token, done | (token == eos_id)

    if use_cache:
        cache = init_cache(model.config, b, total)
        logits, cache = apply(prompt, attention_mask=mask, cache=cache)
        last = logits[rows, _last_real(mask)]

        def step(carry, key):
            cache, last, done = carry
            token, done = finish(pick(last, key), done)
            logits, cache = apply(
                token[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache
            )
            return (cache, logits[:, 0], done), token

        _, new = jax.lax.scan(step, (cache, last, jnp.zeros(b, bool)), keys)
    else:
        # Reference path: the whole sequence is recomputed each step in a fixed buffer; slots
        # not yet written are masked out, and causality keeps them from affecting the rest.
        buffer = jnp.concatenate([prompt, jnp.full((b, max_new_tokens), pad_id, prompt.dtype)], 1)
        buffer_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], 1)

        def step(carry, inputs):
            buffer, buffer_mask, done = carry
            i, key = inputs
            logits = apply(buffer, attention_mask=buffer_mask)
            last = logits[rows, _last_real(buffer_mask)]
            token, done = finish(pick(last, key), done)
            buffer = buffer.at[:, t + i].set(token)
            buffer_mask = buffer_mask.at[:, t + i].set(1)
            return (buffer, buffer_mask, done), token

        _, new = jax.lax.scan(
            step,
            (buffer, buffer_mask, jnp.zeros(b, bool)),
            (jnp.arange(max_new_tokens), keys),
        )
    return jnp.concatenate([prompt, new.T.astype(prompt.dtype)], axis=1)


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
    interventions: Mapping[str, hooks.Intervention] | None = None,
    use_cache: bool = True,
):
    """Generates `max_new_tokens` tokens after each prompt.

    Args:
      model: A `Transformer`.
      params: Its parameters.
      prompt: [B, T] int token ids; padded rows need `attention_mask`.
      max_new_tokens: Number of tokens to add.
      attention_mask: [B, T], 1 for real prompt tokens.
      rng: PRNG key, needed when temperature > 0.
      temperature: 0 for greedy decoding.
      top_k, top_p: Optional truncation of the sampling distribution.
      eos_id: Once a row emits it, the row continues with `pad_id`.
      pad_id: Filler after eos.
      interventions: {hook name or pattern: fn(value) -> value}, applied at every step.
        Compiled programs are cached per set of function objects: reuse the same functions
        across calls to avoid recompiling.
      use_cache: False recomputes the whole sequence each step (a slow reference).

    Returns:
      [B, T + max_new_tokens] token ids: the prompts followed by the generated tokens.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}.")
    if temperature > 0 and rng is None:
        raise ValueError("Sampling (temperature > 0) needs rng=jax.random.key(seed).")
    total = prompt.shape[1] + max_new_tokens
    if model.config.positions == "learned" and total > model.config.max_len:
        raise ValueError(
            f"Prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the model's max_len {model.config.max_len}."
        )
    mask = jnp.ones_like(prompt) if attention_mask is None else jnp.asarray(attention_mask)
    if interventions:
        hooks.resolve(model, list(interventions))  # Fail early, outside the trace.
    # A hashable static argument; functions compare by identity.
    frozen = tuple(sorted(interventions.items())) if interventions else None
    return _generate(
        model,
        params,
        prompt,
        mask.astype(jnp.int32),
        jax.random.key(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        pad_id=pad_id,
        use_cache=use_cache,
        interventions=frozen,
    )
