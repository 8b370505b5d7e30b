"""One Flax decoder; GPT-2, GPT-NeoX/Pythia, Llama, Gemma 2, Gemma 3, Qwen 2/2.5, Qwen 3 and
Mistral are configurations of it.

Legend (used in docstrings and einsums): B batch, T query positions, S key positions, D model
width, N query heads, K key/value heads, G query heads per kv head (N = K * G), H head dim,
F MLP width, V vocabulary.

Hook points per block `blocks_{i}`: resid_pre, attn/q, attn/k, attn/v (after rotary),
attn/pattern [B, N, T, S], attn/z [B, T, N, H], attn_out (after the output projection),
resid_mid (sequential residual only), mlp/in (normed MLP input), mlp/pre_act (up projection,
or gate projection when gated), mlp/up (gated only), mlp/post_act (input of the down
projection), mlp/down (the down projection's output), mlp/out (mlp/down after Gemma's post-MLP
norm; equal to it elsewhere), resid_post; attn_out and mlp/out are what the sublayer adds to the
residual stream (after Gemma's post-norms), so resid_mid = resid_pre + attn_out and
resid_post = resid_mid + mlp/out in every family. Every norm (ln_1, ln_2, ln_f, post norms,
q/k norms) has a `normalized` point before its learned scale and bias (TransformerLens's
hook_normalized). Families with q/k norms (Qwen 3, Gemma 3) add attn/q_pre_norm [B, T, N, H]
and attn/k_pre_norm [B, T, K, H], the projections before those norms; attn/q and attn/k are
then normed and rotated, as everywhere. Top level: final_norm (the final norm's output, what
the unembedding reads). TransformerLens names map to these in `interp.models.sites`.

KV cache: pass `cache=init_cache(...)` and the call returns `(logits, new_cache)`. The cache
holds keys/values for every layer, a key-validity mask and the next write index; see
`interp.models.generate`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interp.models.config import ModelConfig
from interp.models.hooks import HookPoint

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, init=_init):
    cfg = module.config
    return module.param(
        name, nn.with_logical_partitioning(init, axes), shape, cfg.storage_dtype
    ).astype(cfg.compute_dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32. x: [..., D] (or [..., H]
    for the q/k norms, whose `axis` is 'kv')."""

    config: ModelConfig
    axis: str = "embed"  # Logical name of the normalized axis.

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = x.shape[-1]
        xf = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + cfg.norm_eps)
        # Before the learned scale and bias, as TransformerLens's `hook_normalized`.
        xf = HookPoint(name="normalized")(xf)
        scale_init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(scale_init, (self.axis,)),
            (d,),
            cfg.storage_dtype,
        )
        xf = xf * (cfg.norm_offset + scale.astype(jnp.float32))
        if cfg.norm == "layernorm":
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
                (d,),
                cfg.storage_dtype,
            )
            xf = xf + bias.astype(jnp.float32)
        return xf.astype(cfg.compute_dtype)


def _uses_scaling(config: ModelConfig, local: bool) -> bool:
    """Whether this layer's rotary is rescaled: Gemma 3's local layers never are."""
    return config.rope_scaling is not None and not (local and config.rope_local_theta is not None)


def _theta(config: ModelConfig, local: bool) -> float:
    if local and config.rope_local_theta is not None:
        return config.rope_local_theta
    return config.rope_theta


def rotary_inverse_frequencies(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Per-pair rotation frequencies [rotary_dim / 2], with the configured scaling.

    Follows transformers' `modeling_rope_utils`. `local` selects the sliding-window layers'
    rotary (see `ModelConfig.rope_local_theta`). For 'dynamic' these are the frequencies of
    inputs up to max_len; `apply_rotary` grows the base for longer ones.
    """
    dim, theta = config.rotary_dim, _theta(config, local)
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind, factor = config.rope_scaling if _uses_scaling(config, local) else None, config.rope_factor
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "yarn":
        # YaRN (Peng et al. 2023, sec. 3.2): dims that turn fewer than beta_slow times over
        # the original length are interpolated (/ factor), more than beta_fast times kept,
        # with a linear ramp between. Dim d turns r times at d = dim ln(L / 2 pi r) / 2 ln(base).
        def dim_of(rotations):
            length = config.rope_original_max_len
            return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(config.rope_beta_fast), dim_of(config.rope_beta_slow)
        if config.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high  # as transformers: no division by zero
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    elif kind == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths are slowed by `factor`,
        # short ones kept, and the band between interpolated smoothly.
        low_wavelen = config.rope_original_max_len / config.rope_low_freq_factor
        high_wavelen = config.rope_original_max_len / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (config.rope_original_max_len / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary_attention_factor(config: ModelConfig, *, local: bool = False) -> float:
    """The factor on cos and sin (so on rotated q and k dims): YaRN's, else 1."""
    if not _uses_scaling(config, local) or config.rope_scaling != "yarn":
        return 1.0
    return config.yarn_attention_factor


def _dynamic_inverse_frequencies(positions, config: ModelConfig, local: bool):
    """Dynamic NTK: the base grows with the input's length L = max(positions) + 1 past max_len.

    As transformers' forward: L is taken over the whole batch of this call, so in cached
    generation each new token is rotated with its own length's base while earlier keys keep
    theirs (transformers' generate does the same); recomputing without a cache rotates all
    keys with the final length's base instead, so the two agree only up to max_len.
    """
    dim, factor, max_len = config.rotary_dim, config.rope_factor, config.max_len
    length = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    base = _theta(config, local) * (factor * length / max_len - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def apply_rotary(x, positions, config: ModelConfig, *, local: bool = False):
    """Rotates the first rotary_dim dims of each head (half-split convention). x: [B,T,N,H].

    `local`: x belongs to a sliding-window layer (see `ModelConfig.rope_local_theta`).
    """
    if config.rope_scaling == "dynamic" and _uses_scaling(config, local):
        inv_freq = _dynamic_inverse_frequencies(positions, config, local)
    else:
        inv_freq = jnp.asarray(rotary_inverse_frequencies(config, local=local))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    factor = rotary_attention_factor(config, local=local)
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rot, rest = x[..., : config.rotary_dim], x[..., config.rotary_dim :]
    half = config.rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)


def _softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention. x: [B, T, D] -> [B, T, D].

    `sliding`: a sliding-window layer, which may have its own rotary (Gemma 3); the window
    itself is in the mask the caller passes.
    """

    config: ModelConfig
    sliding: bool = False

    @nn.compact
    def __call__(self, x, *, positions, mask, cache=None):
        """x: [B, T, D]; positions [B, T]; mask [B, T, S], True where attending is allowed."""
        cfg = self.config
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        g = n // k

        def project(name, heads):
            # Key/value heads have their own logical name: rules may split query heads
            # without splitting the (often few) kv heads.
            head_axis = "heads" if name == "q" else "kv_heads"
            kernel = _param(self, f"{name}_kernel", (d, heads, h), ("embed", head_axis, "kv"))
            y = jnp.einsum("BTD,DNH->BTNH", x, kernel)
            if cfg.attn_bias:
                bias = _param(
                    self,
                    f"{name}_bias",
                    (heads, h),
                    (head_axis, "kv"),
                    nn.initializers.zeros,
                )
                y = y + bias
            return y

        q, key, value = project("q", n), project("k", k), project("v", k)
        if cfg.qk_norm:
            q = Norm(cfg, "kv", name="q_norm")(HookPoint(name="q_pre_norm")(q))
            key = Norm(cfg, "kv", name="k_norm")(HookPoint(name="k_pre_norm")(key))
        if cfg.positions == "rotary":
            q = apply_rotary(q, positions, cfg, local=self.sliding)
            key = apply_rotary(key, positions, cfg, local=self.sliding)
        q = HookPoint(name="q")(q)
        key = HookPoint(name="k")(key)
        value = HookPoint(name="v")(value)

        new_cache = None
        if cache is not None:
            index = cache["index"]
            key = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], key.astype(cache["k"].dtype), index, axis=1
            )
            value = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], value.astype(cache["v"].dtype), index, axis=1
            )
            new_cache = {"k": key, "v": value}
            key, value = key.astype(cfg.compute_dtype), value.astype(cfg.compute_dtype)

        scale = cfg.query_scale if cfg.query_scale is not None else h**-0.5
        q = q.reshape(*q.shape[:2], k, g, h)  # [B, T, K, G, H]
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key).astype(jnp.float32) * scale
        logits = _softcap(logits, cfg.attn_softcap)

        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
        b, t, s = probs.shape[0], probs.shape[3], probs.shape[4]
        probs = HookPoint(name="pattern")(probs.reshape(b, n, t, s)).reshape(b, k, g, t, s)

        z = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
        z = HookPoint(name="z")(z)
        out_kernel = _param(self, "o_kernel", (n, h, d), ("heads", "kv", "embed"))
        out = jnp.einsum("BTNH,NHD->BTD", z, out_kernel)
        if cfg.attn_out_bias:
            out = out + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros)
        return out, new_cache


def _activation(name):
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


class Mlp(nn.Module):
    """Feed-forward block, plain or gated. x: [B, T, D] -> [B, T, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, post_norm: nn.Module | None = None):
        """post_norm: a norm of the output (Gemma's post-MLP norm) applied before `out`."""
        cfg = self.config
        d, f = cfg.d_model, cfg.mlp_dim
        x = HookPoint(name="in")(x)

        def dense(name, inputs, a, b, axes):
            y = jnp.einsum("BTA,AC->BTC", inputs, _param(self, f"{name}_kernel", (a, b), axes))
            if cfg.mlp_bias:
                y = y + _param(self, f"{name}_bias", (b,), axes[1:], nn.initializers.zeros)
            return nn.with_logical_constraint(y, ("batch", "seq", axes[1]))

        act = _activation(cfg.activation)
        if cfg.gated_mlp:
            gate = HookPoint(name="pre_act")(dense("gate", x, d, f, ("embed", "mlp")))
            up = HookPoint(name="up")(dense("up", x, d, f, ("embed", "mlp")))
            hidden = act(gate) * up
        else:
            hidden = act(HookPoint(name="pre_act")(dense("up", x, d, f, ("embed", "mlp"))))
        hidden = HookPoint(name="post_act")(hidden)
        # The down projection's own output: what its weight gradient is built from (influence
        # tracks it here), before whatever a family places after it (Gemma's post-norm).
        out = HookPoint(name="down")(dense("down", hidden, f, d, ("mlp", "embed")))
        if post_norm is not None:
            out = post_norm(out)
        return HookPoint(name="out")(out)


class Block(nn.Module):
    """One transformer block. x: [B, T, D] -> [B, T, D]."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, x, *, positions, masks, cache=None):
        """masks: {'full': [B, T, S], 'sliding': [B, T, S] or None}."""
        cfg = self.config
        x = HookPoint(name="resid_pre")(x)
        sliding = self.layer_index in cfg.sliding_layers
        attn_out, new_cache = Attention(cfg, sliding, name="attn")(
            Norm(cfg, name="ln_1")(x),
            positions=positions,
            mask=masks["sliding" if sliding else "full"],
            cache=cache,
        )
        # attn_out and mlp/out are what each sublayer adds to the residual stream (after
        # Gemma's post-norms), as TransformerLens's hook_attn_out and hook_mlp_out.
        if cfg.post_norms:
            attn_out = Norm(cfg, name="post_attn_norm")(attn_out)
        attn_out = HookPoint(name="attn_out")(attn_out)
        mlp = Mlp(cfg, name="mlp")
        # Defined here so its parameters stay at blocks_{i}/post_mlp_norm.
        post_mlp_norm = Norm(cfg, name="post_mlp_norm") if cfg.post_norms else None
        if cfg.parallel_residual:
            mlp_out = mlp(Norm(cfg, name="ln_2")(x), post_mlp_norm)
            x = x + attn_out + mlp_out
        else:
            x = HookPoint(name="resid_mid")(x + attn_out)
            mlp_out = mlp(Norm(cfg, name="ln_2")(x), post_mlp_norm)
            x = x + mlp_out
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        return HookPoint(name="resid_post")(x), new_cache


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `max_len` positions (prompt plus generated tokens)."""
    dtype = dtype or config.compute_dtype
    shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
    layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}  # noqa: E731
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch_size, max_len), jnp.int32),
        "positions": jnp.zeros((batch_size, max_len), jnp.int32),
        "layers": {f"blocks_{i}": layer() for i in range(config.num_layers)},
    }


def _check_inputs(cfg, tokens, attention_mask, positions, cache):
    """Shape errors that would otherwise surface deep inside an einsum, or not at all."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be int token ids of shape [batch, length]; got {tokens.dtype} "
            f"{tokens.shape} (add a batch axis with tokens[None] for one sequence)."
        )
    for name, value in (("attention_mask", attention_mask), ("positions", positions)):
        if value is not None and tuple(value.shape) != tuple(tokens.shape):
            raise ValueError(
                f"{name} has shape {value.shape}; it must match tokens {tokens.shape}."
            )
    if cache is not None and cache["mask"].shape[0] != tokens.shape[0]:
        raise ValueError(
            f"The KV cache holds {cache['mask'].shape[0]} rows but tokens have "
            f"{tokens.shape[0]}; build it with init_cache(config, batch_size, max_len)."
        )
    if cfg.positions == "learned" and cache is None and tokens.shape[1] > cfg.max_len:
        raise ValueError(
            f"{tokens.shape[1]} tokens exceed the model's {cfg.max_len} learned positions."
        )


class Transformer(nn.Module):
    """Decoder-only language model.

    Call: `model.apply({'params': params}, tokens, attention_mask=None, positions=None,
    cache=None)`; tokens [B, T] int. Returns float32 logits [B, T, V], or (logits, cache)
    when a cache is passed.

    attention_mask [B, T] marks real tokens (1) against padding (0); padded keys are never
    attended to. Positions default to the running count of real tokens (so left padding
    gives every sequence positions 0, 1, ...), which for unpadded or right-padded input is
    0..T-1 as in Hugging Face.
    """

    config: ModelConfig

    def _positions_and_mask(self, tokens, attention_mask, positions, cache):
        b, t = tokens.shape
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        mask = mask.astype(jnp.int32)
        offset = 0 if cache is None else cache["mask"].sum(axis=1, keepdims=True)
        if positions is None:
            positions = jnp.maximum(offset + jnp.cumsum(mask, axis=1) - 1, 0)
        return positions, mask

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        _check_inputs(cfg, tokens, attention_mask, positions, cache)
        b, t = tokens.shape
        positions, mask = self._positions_and_mask(tokens, attention_mask, positions, cache)
        if cache is None:
            query_slots = key_slots = jnp.arange(t)
            key_mask, key_positions = mask, positions
        else:
            index = cache["index"]
            query_slots = index + jnp.arange(t)
            key_slots = jnp.arange(cache["mask"].shape[1])

            def update(old, new):
                return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), index, 1)

            key_mask = update(cache["mask"], mask)
            key_positions = update(cache["positions"], positions)
        # Causality follows slots (the order tokens arrived in); the sliding window counts
        # positions, so a padded row sees the same window it would see unpadded.
        causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
        full = causal[None] & key_mask[:, None, :].astype(bool)  # [B, T, S]
        masks = {"full": full, "sliding": None}
        if cfg.sliding_layers:
            distance = positions[:, :, None] - key_positions[:, None, :]
            masks["sliding"] = full & (distance < cfg.sliding_window)

        embedding = self.param(
            "embed",
            nn.with_logical_partitioning(_init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            cfg.storage_dtype,
        ).astype(cfg.compute_dtype)
        x = jnp.take(embedding, tokens, axis=0)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model**0.5, cfg.compute_dtype)
        if cfg.positions == "learned":
            pos_embedding = _param(self, "pos_embed", (cfg.max_len, cfg.d_model), (None, "embed"))
            x = x + jnp.take(pos_embedding, positions, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))

        new_layers = {}
        for i in range(cfg.num_layers):
            name = f"blocks_{i}"
            x, new_layers[name] = Block(cfg, i, name=name)(
                x,
                positions=positions,
                masks=masks,
                cache=None if cache is None else dict(cache["layers"][name], index=cache["index"]),
            )
        x = HookPoint(name="final_norm")(Norm(cfg, name="ln_f")(x))
        if cfg.tied_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, embedding)
        else:
            unembed = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
            logits = jnp.einsum("BTD,DV->BTV", x, unembed)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
        logits = _softcap(logits.astype(jnp.float32), cfg.final_softcap)
        if cache is None:
            return logits
        new_cache = {"index": cache["index"] + t, "mask": key_mask, "positions": key_positions}
        return logits, dict(new_cache, layers=new_layers)


def init_params(config: ModelConfig, seed: int = 0):
    """Randomly initialised, unboxed parameters of `Transformer(config)` (on one device)."""
    return _init_params(Transformer(config), jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model, key):
    # Jitted: eager init dispatches every initializer separately (seconds on CPU).
    return nn.meta.unbox(model.init(key, jnp.zeros((1, 2), jnp.int32))["params"])
