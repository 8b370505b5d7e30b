"""Where arrays live: parameter and optimizer-state shardings, sharded init, batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from interp.parallel.mesh import DEFAULT_RULES, Rules, _check_rules, _fit, logical_to_sharding

# ----------------------------------------------------------------------------- parameters


def _sample_tokens(shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.int32)


def abstract_params(model: nn.Module, sample_tokens_shape=(1, 2)) -> Any:
    """The boxed ('LogicallyPartitioned') parameter tree of `model`, as shapes only."""
    variables = jax.eval_shape(model.init, jax.random.key(0), _sample_tokens(sample_tokens_shape))
    return variables["params"]


def param_shardings(
    model: nn.Module,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    sample_tokens_shape: Sequence[int] = (1, 2),
) -> Any:
    """`NamedSharding`s for the (unboxed) parameters of `model`, derived abstractly.

    `jax.eval_shape(model.init)` -> `nn.get_partition_spec` -> rules -> mesh, with
    indivisible dims relaxed; no parameter is materialized.

    Args:
      model: A Flax module whose params carry `nn.with_logical_partitioning` names.
      mesh, rules: As for `logical_to_sharding`.
      sample_tokens_shape: Shape of the token batch `model.init` is traced with.

    Returns:
      A tree matching `nn.meta.unbox(variables['params'])`.
    """
    boxed = abstract_params(model, sample_tokens_shape)
    specs = nn.get_partition_spec(boxed)
    return logical_to_sharding(specs, mesh, rules, shapes=nn.meta.unbox(boxed))


def init_sharded(
    model: nn.Module,
    rng: jax.Array | int,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    sample_tokens_shape: Sequence[int] = (1, 2),
) -> Any:
    """Initializes `model`'s unboxed params directly in their sharded layout.

    `jax.jit(init, out_shardings=param_shardings(...))`: each device only ever holds its
    shards. Works in multi-host (every process calls it with the same rng).

    Args:
      model: The module.
      rng: A PRNG key or an int seed.
      mesh, rules, sample_tokens_shape: As for `param_shardings`.

    Returns:
      The 'params' tree (no `LogicallyPartitioned` boxes) of global, sharded arrays.
    """
    shardings = param_shardings(model, mesh, rules, sample_tokens_shape)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    # Raw key data as NumPy: a host value every process can pass to a multi-host jit.
    key_data = np.asarray(jax.random.key_data(key))
    impl = jax.random.key_impl(key)

    def init(raw_key):
        tokens = jnp.zeros(tuple(sample_tokens_shape), jnp.int32)
        # No rules inside: out_shardings alone set the layout (the raw rules, unrelaxed, would
        # otherwise add constraints to the boxed params and the throwaway forward pass).
        with nn.logical_axis_rules(()):
            variables = model.init(jax.random.wrap_key_data(raw_key, impl=impl), tokens)
        return nn.meta.unbox(variables["params"])

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(key_data)


def _place(tree: Any, shardings: Any) -> Any:
    """Puts each leaf at its sharding; a no-op for arrays already there."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        # Multi-host, host-local value (assumed equal on every process): each process
        # fills in the shards its devices own.
        host = np.asarray(x)
        host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(one, tree, shardings)


def shard_params(
    params: Any,
    model: nn.Module,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    sample_tokens_shape: Sequence[int] = (1, 2),
) -> Any:
    """Lays out an existing plain param tree (e.g. loaded from a checkpoint) as the rules say.

    In multi-host, host values must be the same on every process.
    """
    shardings = param_shardings(model, mesh, rules, sample_tokens_shape)
    got, want = jax.tree.structure(params), jax.tree.structure(shardings)
    if got != want:
        raise ValueError(f"Param tree does not match the model's: got {got}, the model has {want}.")
    return _place(params, shardings)


def optimizer_state_shardings(
    optimizer: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings of `optimizer.init(params)`: moments laid out like their params.

    Leaves that are not per-parameter (step counts, schedule states) are replicated. Derived
    abstractly from `param_shapes` (arrays or `ShapeDtypeStruct`s); nothing is materialized.

    Args:
      optimizer: An `optax.GradientTransformation`.
      param_shapes: The unboxed param tree, as shapes.
      param_shardings: The matching tree of `NamedSharding`s (`param_shardings`).
      mesh: The mesh (for the replicated leaves).

    Returns:
      A tree matching `optimizer.init(params)`.
    """
    import optax  # Only here: the rest of this module knows nothing of optimizers.

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        jax.eval_shape(optimizer.init, param_shapes),
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


# ----------------------------------------------------------------------------- batches


def _batch_rules(rules: Rules, mesh: Mesh, batch_size: int | None):
    """Rules whose 'batch' entry is cut down to mesh axes that divide `batch_size`."""
    if batch_size is None:
        return tuple(rules)
    out = []
    for name, axes in rules:
        if name == "batch" and axes is not None:
            axes = _fit(PartitionSpec(axes), (batch_size,), mesh)[0][0]
        out.append((name, axes))
    return tuple(out)


def batch_sharding(
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    ndim: int = 2,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """Sharding of a [B, T, ...] array: B by the 'batch' rule, T by 'seq', the rest replicated.

    With `shape`, indivisible dims are relaxed (see module docstring).
    """
    if ndim < 1:
        return NamedSharding(mesh, PartitionSpec())
    names = (("batch", "seq") + (None,) * ndim)[:ndim]
    shapes = None if shape is None else jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return logical_to_sharding(PartitionSpec(*names), mesh, rules, shapes=shapes)


def _leading_size(tree: Any) -> int | None:
    for leaf in jax.tree.leaves(tree):
        if np.ndim(leaf) >= 1:
            return int(np.shape(leaf)[0])
    return None


def _batch_tree_shardings(tree, mesh, rules, batch_size, *, seq=True):
    """Batch layout for leaves with leading dim `batch_size`; others replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        shape = np.shape(leaf)
        if batch_size is None or len(shape) == 0 or shape[0] != batch_size:
            return replicated
        if seq:
            return batch_sharding(mesh, rules, len(shape), shape)
        return batch_sharding(mesh, rules, 1, shape[:1])

    return jax.tree.map(one, tree)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places a tree of [B, T, ...] arrays: batch over the 'batch' mesh axes.

    B is the leading dim of the first non-scalar leaf; leaves with another leading size and
    scalars are replicated. In multi-host every process passes the same global batch.
    """
    rules = _check_rules(rules, mesh)
    batch_size = _leading_size(batch)
    return _place(batch, _batch_tree_shardings(batch, mesh, rules, batch_size))
