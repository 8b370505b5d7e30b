"""Hook points: named sites in a model where activations are captured, replaced or differentiated.

A `HookPoint` is an identity submodule; its module path (`blocks_3/resid_post`) is the hook
name. Nothing about hooks is threaded through `__call__` arguments: capture and intervention
wrap `model.apply` in a Flax method interceptor that acts only on the hook points asked for, so
a model run without hooks is exactly the plain model, and everything here works under
`jax.jit`, `jax.grad` and with sharded parameters.

Three ways to use a site:

    # Capture: logits plus {name: value}.
    logits, acts = hooks.run_with_hooks(model, params, tokens,
                                        capture=["blocks_1/resid_post", "blocks_*/mlp/out"])
    # Intervene: replace a site's value with fn(value) (steering, SAE splicing, ablation).
    logits, _ = hooks.run_with_hooks(model, params, tokens,
                                     interventions={"blocks_1/mlp/out": jnp.zeros_like})
    # Differentiate: d loss / d value at any site (K-FAC, attribution).
    loss, acts, grads = hooks.hook_grads(model, params, tokens, loss_fn, ["blocks_0/mlp/out"])

Under `jax.jit` with sharded parameters over a mesh: `sharded_run_with_hooks(model, mesh, ...)`.

Names may be exact or shell-style patterns (`blocks_*/resid_pre`), or TransformerLens names
(`blocks.1.hook_resid_post`; results are keyed by interp's names); a name or pattern that
matches no site is an error listing the valid names. What a site holds per token (head-shaped
sites, patterns) is in `interp.models.sites`.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from interp import parallel
from interp.models import sites

Intervention = Callable[[jax.Array], jax.Array]


class HookPoint(nn.Module):
    """Identity that names an activation. Its module path is the hook name."""

    @nn.compact
    def __call__(self, x):
        return x


def hook_name(module: nn.Module) -> str:
    return "/".join(module.path)


@functools.lru_cache(maxsize=64)
def _names_for(model: nn.Module) -> tuple[str, ...]:
    seen: list[str] = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, HookPoint) and context.method_name == "__call__":
            seen.append(hook_name(context.module))
        return next_fun(*args, **kwargs)

    tokens = jnp.zeros((1, 2), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), tokens)
    return tuple(dict.fromkeys(seen))


def hook_names(model: nn.Module) -> list[str]:
    """All hook names of `model`, in the order the forward pass reaches them."""
    return list(_names_for(model))


def _summarize(names: Iterable[str]) -> str:
    """Folds 'blocks_0/x', 'blocks_1/x', ... into 'blocks_{0..1}/x' so long lists stay legible."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.match(r"blocks_(\d+)/(.*)", name)
        key = f"blocks_{{}}/{match.group(2)}" if match else name
        groups.setdefault(key, []).append(int(match.group(1)) if match else -1)
    parts = []
    for key, layers in groups.items():
        if "{}" in key:
            span = f"{min(layers)}..{max(layers)}" if len(layers) > 1 else str(layers[0])
            parts.append(key.replace("{}", "{" + span + "}"))
        else:
            parts.append(key)
    return ", ".join(parts)


def resolve(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Expands patterns and checks names against the model's hook points.

    Args:
      model: The model whose hook points are named.
      names: Exact hook names or fnmatch patterns such as 'blocks_*/resid_post', or
        TransformerLens names ('blocks.3.hook_resid_post', 'blocks.*.attn.hook_z'),
        translated by `sites.from_transformer_lens`.

    Returns:
      The matching hook names (interp's spelling), in forward order, without duplicates.

    Raises:
      ValueError: naming each unknown entry, close matches, and all valid names
        (`sites.UnknownTransformerLensName` for a TransformerLens name with no equal site).
    """
    if isinstance(names, str):
        names = [names]
    valid = _names_for(model)
    wanted: set[str] = set()
    for name in names:
        name = sites.from_transformer_lens(name, getattr(model, "config", None))
        matches = [v for v in valid if fnmatch.fnmatchcase(v, name)]
        if not matches:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"Unknown hook name {name!r}.{hint} Valid hook names are: {_summarize(valid)} "
                "(patterns like 'blocks_*/resid_post' are accepted)."
            )
        wanted.update(matches)
    return [v for v in valid if v in wanted]


def _resolve_interventions(
    model: nn.Module, interventions: Mapping[str, Intervention] | None
) -> dict[str, Intervention]:
    out: dict[str, Intervention] = {}
    given_as: dict[str, str] = {}
    for pattern, fn in (interventions or {}).items():
        if not callable(fn):
            raise TypeError(
                f"Intervention for {pattern!r} must be a function value -> value, got {type(fn)}."
            )
        for name in resolve(model, [pattern]):
            if name in out:
                raise ValueError(
                    f"Hook {name!r} is given two interventions, by {given_as[name]!r} and "
                    f"{pattern!r} (a pattern, or a TransformerLens name for the same site); "
                    "compose them into one function."
                )
            out[name], given_as[name] = fn, pattern
            check_site = getattr(fn, "check_site", None)  # E.g. steering's: the SAE's site.
            if callable(check_site):
                check_site(model, name)
    return out


def _apply_intervention(name: str, fn: Intervention, value: jax.Array) -> jax.Array:
    new = fn(value)
    if getattr(new, "shape", None) != value.shape:
        raise ValueError(
            f"Intervention at hook {name!r} returned shape {getattr(new, 'shape', None)}; it "
            f"must return the input's shape {value.shape}."
        )
    return jnp.asarray(new).astype(value.dtype)


@contextlib.contextmanager
def hooked(
    model: nn.Module,
    *,
    capture: Iterable[str] = (),
    interventions: Mapping[str, Intervention] | None = None,
):
    """Context in which `model.apply` captures and intervenes at the given hook points.

    Captured values are sown into the 'intermediates' collection (apply with
    `mutable=['intermediates']`, then read them with `captured(state)`). Prefer
    `run_with_hooks`; this is the mechanism under it and under generation.
    """
    capture_set = set(resolve(model, list(capture))) if capture else set()
    active = _resolve_interventions(model, interventions)

    def interceptor(next_fun, args, kwargs, context):
        value = next_fun(*args, **kwargs)
        if not isinstance(context.module, HookPoint) or context.method_name != "__call__":
            return value
        name = hook_name(context.module)
        if name in active:
            value = _apply_intervention(name, active[name], value)
        if name in capture_set:
            context.module.sow("intermediates", "value", value)
        return value

    with nn.intercept_methods(interceptor):
        yield


def captured(state: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flattens the sown 'intermediates' collection into {hook name: value}."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(
        dict(state.get("intermediates", {})), is_leaf=lambda x: isinstance(x, tuple)
    )[0]
    for path, leaf in flat:
        keys = [p.key for p in path]
        if keys and keys[-1] == "value":
            out["/".join(keys[:-1])] = leaf[-1]
    return out


def run_with_hooks(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    *,
    capture: Iterable[str] = (),
    interventions: Mapping[str, Intervention] | None = None,
    **model_kwargs,
) -> tuple[Any, dict[str, jax.Array]]:
    """Runs `model` while capturing and/or replacing activations at hook points.

    Args:
      model: A `Transformer` (any Flax module with `HookPoint`s).
      params: Its parameters (the 'params' collection, not wrapped).
      tokens: [B, T] int token ids.
      capture: Hook names or patterns whose values to return (after any intervention).
      interventions: {hook name or pattern: fn(value) -> value of the same shape}. An
        intervention with a `check_site(model, name)` method is told where it is placed
        (steering warns when an SAE is used at another site than its own).
      **model_kwargs: Passed to the model (attention_mask, positions, cache).

    Returns:
      (the model's output, {hook name: value}).
    """
    capture = list(capture)
    with hooked(model, capture=capture, interventions=interventions):
        if not capture:
            return model.apply({"params": params}, tokens, **model_kwargs), {}
        out, state = model.apply(
            {"params": params}, tokens, mutable=["intermediates"], **model_kwargs
        )
    return out, captured(state)


def hook_grads(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_fn: Callable[[Any], jax.Array],
    names: Iterable[str],
    *,
    interventions: Mapping[str, Intervention] | None = None,
    loss_reads_values: bool = False,
    **model_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Gradient of a scalar loss with respect to the values at hook points.

    Implemented as an additive zero perturbation at each site (applied after any
    intervention) and `jax.grad` with respect to it, so it composes with `jax.jit` and costs
    one forward and one backward pass.

    Args:
      model, params, tokens, interventions, **model_kwargs: As for `run_with_hooks`.
      loss_fn: The model's output -> scalar loss. For per-token gradients use a sum over
        tokens, not a mean. With `loss_reads_values`, (output, {name: value}) -> scalar: a
        loss of hook values too (an SAE feature's activation), differentiated through them.
      names: Hook names or patterns.
      loss_reads_values: Pass the values at `names` to `loss_fn` as well.

    Returns:
      (loss, {name: value at the site}, {name: d loss / d value}).
    """
    names = resolve(model, list(names))
    active = _resolve_interventions(model, interventions)

    def shapes():
        return run_with_hooks(
            model,
            params,
            tokens,
            capture=names,
            interventions=interventions,
            **model_kwargs,
        )[1]

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(shapes))

    def perturbed(deltas):
        combined = dict(active)
        for name in names:
            inner = active.get(name, lambda v: v)
            combined[name] = lambda v, inner=inner, d=deltas[name]: inner(v) + d
        out, acts = run_with_hooks(
            model, params, tokens, capture=names, interventions=combined, **model_kwargs
        )
        return (loss_fn(out, acts) if loss_reads_values else loss_fn(out)), acts

    (loss, acts), grads = jax.value_and_grad(perturbed, has_aux=True)(zeros)
    return loss, acts, grads


def sharded_run_with_hooks(
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
    *,
    capture: Iterable[str] = (),
    interventions: Mapping[str, Intervention] | None = None,
    params_sharding: Any = None,
) -> Callable[..., Any]:
    """Sharded, jitted `run_with_hooks`: `run(params, tokens, **model_kwargs)`.

    Returns (output, {hook name: value}); captured values are batch-sharded like the logits.
    Interventions are closed over (they are functions), so a new set needs a new call here.
    """
    if params_sharding is None:
        params_sharding = parallel.param_shardings(model, mesh, rules)
    capture = list(resolve(model, capture)) if capture else []
    resolve(model, list(interventions or {}))  # Fail early on unknown names.

    def run(params, tokens, **model_kwargs):
        return run_with_hooks(
            model,
            params,
            tokens,
            capture=capture,
            interventions=interventions,
            **model_kwargs,
        )

    return parallel.sharded_jit(run, mesh, rules, params_sharding=params_sharding)
