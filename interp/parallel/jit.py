"""Jitted calls with explicit in/out shardings, traced under the mesh and the rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from interp.parallel.mesh import DEFAULT_RULES, Rules, _check_rules
from interp.parallel.placement import (
    _batch_rules,
    _batch_tree_shardings,
    _leading_size,
    _place,
    param_shardings,
    shard_batch,
)


def sharded_jit(
    fn: Callable[..., Any],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    params_sharding: Any,
    out_shardings: Any = None,
) -> Callable[..., Any]:
    """`jax.jit` of `fn(params, *arrays, **arrays)` with explicit in/out shardings.

    The call runs under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, so the
    model's `with_logical_constraint`s take effect. Params are placed at `params_sharding`
    (free when already there); the other arguments are placed like `shard_batch`. Outputs
    whose leading dim is the batch size are batch-sharded, the rest replicated, unless
    `out_shardings` is given. One compilation per distinct argument shape signature.

    Args:
      fn: (params, *args, **kwargs) -> tree of arrays. Arguments other than params must be
        arrays (or trees of them); close over anything static (functions, names, flags).
      mesh: The mesh.
      rules: Logical-axis rules; the 'batch' rule is cut down for batches it does not divide.
      params_sharding: From `param_shardings(model, mesh, rules)`.
      out_shardings: Optional explicit output shardings (a tree or prefix).

    Returns:
      A function with `fn`'s signature returning global (sharded) arrays; its `.lower`
      takes the same arguments and gives the `jax.stages.Lowered` computation.
    """
    rules = _check_rules(rules, mesh)
    explicit = [
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    ]
    if explicit:
        raise ValueError(
            f"Mesh axes {explicit} are Explicit (the default of jax.make_mesh), under which the "
            "model's with_logical_constraint calls become assertions; build the mesh with "
            "parallel.make_mesh, or pass axis_types=(jax.sharding.AxisType.Auto,) * ndim."
        )
    compiled: dict[Any, Callable[..., Any]] = {}

    def build(params, batch, batch_size):
        call_rules = _batch_rules(rules, mesh, batch_size)

        def body(params, batch):
            args, kwargs = batch
            with nn.logical_axis_rules(call_rules):
                return fn(params, *args, **kwargs)

        in_shardings = (
            params_sharding,
            _batch_tree_shardings(batch, mesh, rules, batch_size),
        )
        outs = out_shardings
        if outs is None:
            abstract = jax.eval_shape(body, params, batch)
            outs = _batch_tree_shardings(abstract, mesh, call_rules, batch_size, seq=False)
        return jax.jit(body, in_shardings=in_shardings, out_shardings=outs)

    def prepare(params, args, kwargs):
        params = _place(params, params_sharding)
        batch = shard_batch((args, kwargs), mesh, rules)
        leaves, treedef = jax.tree.flatten(batch)
        signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
        if signature not in compiled:
            compiled[signature] = build(params, batch, _leading_size(batch))
        return compiled[signature], params, batch

    def call(params, *args, **kwargs):
        with jax.set_mesh(mesh):
            jitted, params, batch = prepare(params, args, kwargs)
            return jitted(params, batch)

    def lower(params, *args, **kwargs):
        with jax.set_mesh(mesh):
            jitted, params, batch = prepare(params, args, kwargs)
            return jitted.lower(params, batch)

    call.lower = lower  # For inspecting HLO / cost analysis.
    return call


def sharded_apply(
    model: nn.Module,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    params_sharding: Any = None,
    out_shardings: Any = None,
) -> Callable[..., Any]:
    """Sharded, jitted `model.apply`: `forward(params, tokens, **model_kwargs)`.

    Model kwargs (attention_mask, positions, cache) are batch-leading arrays and are sharded
    likewise; logits come back [B, T, V] with B over the batch mesh axes.
    """
    shardings = param_shardings(model, mesh, rules) if params_sharding is None else params_sharding

    def forward(params, tokens, **model_kwargs):
        return model.apply({"params": params}, tokens, **model_kwargs)

    return sharded_jit(forward, mesh, rules, params_sharding=shardings, out_shardings=out_shardings)
