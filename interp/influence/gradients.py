"""Tracked linear layers and, in one forward + backward pass, their inputs and output gradients.

A tracked layer y = W x + b is a pair of hook sites around one projection: its input site
(`mlp/in` for the up/gate projections, `mlp/post_act` for the down projection) and its output
site (`mlp/pre_act`, `mlp/up`, `mlp/down`): the projection's own input and output, never a site a
family places something after (`mlp/out` follows Gemma's post-MLP norm, so its gradient is not
the down projection's output gradient). Capturing the input and differentiating at the output
(`hooks.hook_grads`) gives, for every token t of every sequence,

    a_t = [x_t; 1]  (the 1 only where the layer has a bias)      [B, T, I]
    g_t = dL/dy_t   (L the sequence's summed loss)                [B, T, O]

from which the per-sequence weight gradient is G_n = sum_t g_t a_t^T [O, I] (Grosse et al. 2023,
"Studying Large Language Model Generalization with Influence Functions", section 2), never
formed here. Legend: B batch, T positions, I layer inputs (+1 for a bias), O layer outputs,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interp import parallel
from interp.models import hooks


@dataclasses.dataclass(frozen=True)
class TrackedModule:
    """One linear layer whose curvature EK-FAC models.

    Attributes:
      name: 'blocks_3/mlp/up' (the layer's kernel path without '_kernel').
      input_hook: The site holding x ('blocks_3/mlp/in').
      output_hook: The site holding y = W x + b ('blocks_3/mlp/pre_act').
      kernel: Param path of W, stored [I, O] ('blocks_3', 'mlp', 'up_kernel').
      bias: Param path of b, or None.
    """

    name: str
    input_hook: str
    output_hook: str
    kernel: tuple[str, ...]
    bias: tuple[str, ...] | None


def _mlp_modules(config, layer: int) -> list[TrackedModule]:
    prefix = f"blocks_{layer}/mlp"
    projections = (
        [("gate", "in", "pre_act"), ("up", "in", "up")]
        if config.gated_mlp
        else [("up", "in", "pre_act")]
    )
    projections.append(("down", "post_act", "down"))
    out = []
    for proj, source, target in projections:
        path = (f"blocks_{layer}", "mlp")
        out.append(
            TrackedModule(
                name=f"{prefix}/{proj}",
                input_hook=f"{prefix}/{source}",
                output_hook=f"{prefix}/{target}",
                kernel=path + (f"{proj}_kernel",),
                bias=path + (f"{proj}_bias",) if config.mlp_bias else None,
            )
        )
    return out


def all_modules(model) -> list[TrackedModule]:
    """Every MLP projection of a `Transformer` (gated MLPs: gate, up and down)."""
    return [m for i in range(model.config.num_layers) for m in _mlp_modules(model.config, i)]


def tracked_modules(model, names: Iterable[str] | None = None) -> tuple[TrackedModule, ...]:
    """The tracked layers: every MLP projection, or those matching `names`.

    Args:
      model: A `Transformer`.
      names: Module names or shell-style patterns ('blocks_*/mlp/down', 'blocks_1/mlp/*');
        None tracks every MLP projection.

    Raises:
      ValueError: For a name or pattern that matches no module, listing the valid ones.
    """
    available = all_modules(model)
    if names is None:
        return tuple(available)
    names = [names] if isinstance(names, str) else list(names)
    chosen: dict[str, TrackedModule] = {}
    for pattern in names:
        matched = [m for m in available if fnmatch.fnmatchcase(m.name, pattern)]
        if not matched:
            raise ValueError(
                f"No tracked module matches {pattern!r}. Valid modules: "
                f"{', '.join(m.name for m in available[:6])}"
                f"{', ...' if len(available) > 6 else ''} (blocks_0..blocks_"
                f"{model.config.num_layers - 1}; patterns such as 'blocks_*/mlp/down' work)."
            )
        chosen.update({m.name: m for m in matched})
    return tuple(m for m in available if m.name in chosen)


def _with_bias_column(x: jax.Array, module: TrackedModule) -> jax.Array:
    """[B, T, I] -> [B, T, I + 1] with a homogeneous 1 where the layer has a bias."""
    x = x.astype(jnp.float32)
    if module.bias is None:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def check_batch(batch: Mapping[str, Any], max_len: int, what: str) -> dict[str, np.ndarray]:
    """{'tokens', 'loss_mask', 'attention_mask'} as arrays, or a clear error.

    Raises:
      ValueError: For a missing 'tokens', wrong shapes, sequences longer than the model's
        context, or a loss mask that scores nothing.
    """
    if "tokens" not in batch:
        raise ValueError(f"A {what} batch is a dict with 'tokens' [B, T]; got {sorted(batch)}.")
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} tokens must be int [B, T]; got {tokens.dtype} {tokens.shape}.")
    if tokens.shape[1] > max_len:
        raise ValueError(
            f"{what} sequences have {tokens.shape[1]} tokens, more than the model's context "
            f"of {max_len}; truncate or split them."
        )
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss_mask = np.ones(tokens.shape, np.float32)
        loss_mask[:, 0] = 0
    loss_mask = np.asarray(loss_mask, np.float32)
    if loss_mask.shape != tokens.shape:
        raise ValueError(f"{what} loss_mask {loss_mask.shape} must match tokens {tokens.shape}.")
    loss_mask = loss_mask.copy()
    loss_mask[:, 0] = 0  # Position 0 is never a predicted target.
    empty = np.flatnonzero(loss_mask.sum(axis=1) == 0)
    if len(empty):
        raise ValueError(
            f"{what} rows {empty[:5].tolist()} score no token (all-zero loss_mask after "
            "position 0); mark the completion tokens with 1."
        )
    attention_mask = np.asarray(batch.get("attention_mask", np.ones(tokens.shape)), np.int32)
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}


def sequence_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B]: the summed NLL of targets[:, 1:] under logits[:, :-1], scored where loss_mask is 1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[:, 1:, None], axis=-1)[..., 0]
    return (nll * loss_mask[:, 1:]).sum(axis=1)


def sampled_targets(logits: jax.Array, tokens: jax.Array, key: jax.Array) -> jax.Array:
    """tokens with each target t >= 1 drawn from the model's p(. | tokens[:t]) (true Fisher)."""
    drawn = jax.random.categorical(key, logits[:, :-1].astype(jnp.float32))
    return jnp.concatenate([tokens[:, :1], jax.lax.stop_gradient(drawn)], axis=1)


MeasurementFn = Callable[[jax.Array, Mapping[str, jax.Array], Mapping[str, jax.Array]], jax.Array]


def inputs_and_grads(
    model,
    params: Any,
    batch: Mapping[str, jax.Array],
    modules: Sequence[TrackedModule],
    *,
    key: jax.Array | None = None,
    measurement: MeasurementFn | None = None,
    extra_hooks: Sequence[str] = (),
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{module name: (a [B, T, I], g [B, T, O])} for one batch, in float32.

    g is the gradient of the per-sequence loss: the summed NLL of the scored targets (the
    data's own next tokens, or with `key` tokens sampled from the model), or, with
    `measurement`, of minus the measurement (so that a query's g points the way its NLL's
    does for the default log-probability measurement). Rows never mix: each sequence's g only
    carries its own loss. Padding positions (attention_mask 0) get a = 0.

    Args:
      model, params: The model.
      batch: 'tokens' [B, T], 'loss_mask' [B, T], 'attention_mask' [B, T] (`check_batch`).
      modules: The tracked layers.
      key: Sample the targets from the model (the true Fisher); None uses the data's tokens.
      measurement: (logits [B, T, V], batch, {hook: value}) -> [B] scalars to differentiate.
      extra_hooks: More hook sites whose values the measurement reads.
    """
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    attention_mask = batch["attention_mask"]
    names = sorted({m.input_hook for m in modules} | {m.output_hook for m in modules})
    extra = {hook: _one_site(model, hook) for hook in extra_hooks}  # As spelled -> ours.
    names += sorted(set(extra.values()) - set(names))

    def loss_fn(logits, values):
        if measurement is not None:
            # The measurement reads its hooks as it spelled them (ours or TransformerLens's).
            values = {**values, **{hook: values[name] for hook, name in extra.items()}}
            return -measurement(logits, batch, values).sum()
        targets = tokens if key is None else sampled_targets(logits, tokens, key)
        return sequence_nll(logits, targets, loss_mask).sum()

    _, values, grads = hooks.hook_grads(
        model,
        params,
        tokens,
        loss_fn,
        names,
        loss_reads_values=True,
        attention_mask=attention_mask,
    )
    real = attention_mask[..., None].astype(jnp.float32)
    return {
        m.name: (
            _with_bias_column(values[m.input_hook], m) * real,
            grads[m.output_hook].astype(jnp.float32),
        )
        for m in modules
    }


def _one_site(model, hook: str) -> str:
    names = hooks.resolve(model, [hook])
    if len(names) != 1:
        raise ValueError(
            f"The measurement reads {hook!r}, which matches {len(names)} hook points "
            f"({names[:4]}...); name one site."
        )
    return names[0]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where influence computations run: one device, or a mesh with batches over 'data'.

    With a mesh, params are laid out by the logical-axis rules and every batch is split over
    the batch mesh axes, so covariances, corrections and scores are sums that XLA reduces
    across devices; no per-example gradient ever gathers on one device.
    """

    mesh: jax.sharding.Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @classmethod
    def of(cls, mesh, rules) -> Placement:
        return cls(mesh, parallel.rules_from_config(rules))

    def params(self, model, params):
        if self.mesh is None:
            return params
        return parallel.shard_params(params, model, self.mesh, self.rules)

    def batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return parallel.shard_batch(dict(batch), self.mesh, self.rules)

    @contextlib.contextmanager
    def context(self):
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield
