"""Meshes, logical-axis rules and shardings: the one place that knows about devices.

Model code names axes logically (`nn.with_logical_partitioning` on parameters,
`nn.with_logical_constraint` on activations); this module maps those names to the axes of a
`jax.sharding.Mesh` with `(logical name, mesh axes)` rules and hands out `NamedSharding`s.

    mesh = parallel.make_mesh(data=2, model=4)            # or mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get('rules'))  # None -> DEFAULT_RULES
    params = parallel.init_sharded(Transformer(cfg), jax.random.key(0), mesh, rules)
    forward = parallel.sharded_apply(Transformer(cfg), mesh, rules)
    logits = forward(params, tokens)                        # [B, T, V], batch over data

    # Hooks: capture / intervene under jit with sharded params.
    run = parallel.sharded_run_with_hooks(model, mesh, rules, capture=['blocks_*/resid_post'])
    logits, acts = run(params, tokens)
    # Anything else taking (params, batch arrays...), e.g. gradients at hook points:
    grads = parallel.sharded_jit(
        lambda p, t: hooks.hook_grads(model, p, t, loss_fn, names)[2], mesh, rules,
        params_sharding=parallel.param_shardings(model, mesh, rules))(params, tokens)

Writing your own jitted step instead: trace it under both contexts, or the model's activation
constraints are silently dropped (flax reads the rules at trace time):

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(step_fn, in_shardings=(param_shardings(model, mesh, rules),
                                              batch_sharding(mesh, rules, 2, shape)), ...)
        state, metrics = step(state, shard_batch(tokens, mesh, rules))

Indivisible dimensions: a rule that would split a dimension over mesh axes whose size does not
divide it (6 kv heads over model=4, a batch of 6 over data=4) is relaxed for that array only:
mesh axes are dropped from the end of the rule until the rest divides, down to replication,
and a warning is logged once. Nothing fails, the layout is just less split than asked.

Multi-host: call `initialize_distributed` first thing; build the mesh from all (global)
devices; feed every process the same global batch (or see `jax.make_array_from_process_local_data`
for per-process shards); read results with `process_allgather`, which needs `tiled=True` for
arrays spread over processes (it passes it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from interp.models import hooks

MESH_AXES = ("data", "fsdp", "model")

# (logical name, mesh axes). Order matters: flax gives a mesh axis to the first rule that
# asks for it within one array, so 'batch' takes data+fsdp before 'embed' can take fsdp on
# activations, while weights (which have no batch dim) are FSDP-split along 'embed'.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("latent", "model"),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning(message)


# ----------------------------------------------------------------------------- meshes


def make_mesh(
    data: int = -1,
    model: int = 1,
    fsdp: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'model') over all (global) devices.

    Args:
      data: Data-parallel size; -1 takes whatever the other axes leave.
      model: Tensor-parallel size (heads, MLP width, vocabulary, SAE latents).
      fsdp: Parameter-sharded data-parallel size (weights split along 'embed').
      devices: Devices to use; defaults to `jax.devices()` (every process's, in multi-host).

    Returns:
      A `Mesh` of shape (data, fsdp, model) with `Auto` axis types, so that
      `with_logical_constraint` inside models acts as a hint, not an assertion.

    Raises:
      ValueError: naming the sizes and the device count when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"Mesh axis {name}={size!r} must be a positive int or -1.")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"Only one mesh axis may be -1; got {sizes}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if count % fixed:
            others = " * ".join(f"{n}={s}" for n, s in sizes.items() if s != -1)
            raise ValueError(
                f"Cannot build mesh {sizes} on {count} devices: {free[0]}=-1 needs the "
                f"device count {count} to be divisible by {others} = {fixed}."
            )
        sizes[free[0]] = count // fixed
    elif fixed != count:
        raise ValueError(
            f"Mesh data={data} * fsdp={fsdp} * model={model} = {fixed} devices, but "
            f"{count} devices are available; make the product {count} or set one axis to -1."
        )
    shape = tuple(int(sizes[name]) for name in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_from_config(config: Mapping[str, Any] | None) -> Mesh:
    """`make_mesh` from a dict / ConfigDict such as `dict(data=-1, model=1)` (fsdp optional)."""
    values = dict(config or {})
    unknown = sorted(set(values) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh field(s) {unknown}; valid fields are {MESH_AXES}.")
    return make_mesh(**values)


# ----------------------------------------------------------------------------- rules


def _normalize_axes(axes: Any) -> Any:
    if axes is None or isinstance(axes, str):
        return axes
    axes = tuple(axes)
    if not all(isinstance(a, str) for a in axes):
        raise ValueError(f"Mesh axes in a rule must be strings; got {axes!r}.")
    return axes if axes else None


def rules_from_config(rules: Iterable[Any] | None) -> tuple[tuple[str, Any], ...]:
    """Rules from config: a list of [logical name, mesh axis | [mesh axes] | None] pairs.

    None or an empty sequence gives `DEFAULT_RULES`. Lists (as JSON or ml_collections may
    produce) become tuples.
    """
    rules = [] if rules is None else list(rules)
    if not rules:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        rule = tuple(rule)
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"A logical-axis rule is a (logical name, mesh axes) pair; got {rule!r}."
            )
        out.append((rule[0], _normalize_axes(rule[1])))
    return tuple(out)


def _check_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    rules = rules_from_config(rules)
    for name, axes in rules:
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        bad = [a for a in names if a not in mesh.axis_names]
        if bad:
            raise ValueError(
                f"Rule ({name!r}, {axes!r}) names mesh axes {bad} that the mesh lacks; "
                f"mesh axes are {mesh.axis_names}."
            )
    return rules


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh):
    """Drops trailing mesh axes from each dim's entry until its size divides the dim.

    Returns the relaxed spec and a note per relaxed dim.
    """
    if len(spec) > len(shape):
        raise ValueError(f"Sharding spec {spec} has more entries than shape {shape}.")
    entries, notes = [], []
    for dim, (entry, size) in enumerate(zip(spec, shape[: len(spec)], strict=True)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        kept, split = [], 1
        for axis in axes:
            if size % (split * mesh.shape[axis]):
                break
            kept.append(axis)
            split *= mesh.shape[axis]
        if len(kept) < len(axes):
            notes.append(
                f"dim {dim} (size {size}) over {tuple(kept) or 'nothing'} instead of "
                f"{tuple(axes)} (sizes {[mesh.shape[a] for a in axes]})"
            )
        if not kept:
            entries.append(None)
        elif isinstance(entry, str):
            entries.append(entry)
        else:
            entries.append(tuple(kept))
    return PartitionSpec(*entries), notes


def _warn_relaxed(notes: dict[str, list[str]]) -> None:
    """One warning for all relaxed arrays, with per-layer paths folded into 'blocks_*'."""
    if not notes:
        return
    folded: dict[str, str] = {}
    for path, what in notes.items():
        folded.setdefault(re.sub(r"blocks_\d+", "blocks_*", path), "; ".join(what))
    lines = "\n  ".join(f"{path}: {what}" for path, what in folded.items())
    _warn_once(
        "Dimensions not divisible by their mesh axes are sharded less than the rules ask "
        f"(replicated where nothing divides):\n  {lines}"
    )


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "array"


def _is_logical_leaf(x) -> bool:
    return (
        x is None
        or isinstance(x, PartitionSpec)
        or (isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))
    )


def logical_to_sharding(
    logical_specs: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shapes: Any = None,
) -> Any:
    """Maps a tree of logical specs to a tree of `NamedSharding`s.

    Args:
      logical_specs: Tree whose leaves are `PartitionSpec`s or tuples of logical names
        (e.g. `('embed', 'mlp')`), or None for replicated.
      mesh: The mesh.
      rules: (logical name, mesh axes) pairs; names without a rule stay replicated.
      shapes: Optional matching tree of arrays / `ShapeDtypeStruct`s. With it, a dim that
        does not divide over its mesh axes is relaxed (see module docstring).

    Returns:
      A tree of `NamedSharding` with the structure of `logical_specs`.
    """
    rules = _check_rules(rules, mesh)
    notes: dict[str, list[str]] = {}

    def one(path, logical, shape=None):
        names = () if logical is None else tuple(logical)
        spec = nn.logical_to_mesh_axes(names, rules)
        if shape is not None:
            spec, relaxed = _fit(spec, shape.shape, mesh)
            if relaxed:
                notes[_path_name(path)] = relaxed
        return NamedSharding(mesh, spec)

    trees = (logical_specs,) if shapes is None else (logical_specs, shapes)
    out = jax.tree_util.tree_map_with_path(one, *trees, is_leaf=_is_logical_leaf)
    _warn_relaxed(notes)
    return out


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


# ----------------------------------------------------------------------------- jitted calls


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


def sharded_run_with_hooks(
    model: nn.Module,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    capture: Iterable[str] = (),
    interventions: Mapping[str, hooks.Intervention] | None = None,
    params_sharding: Any = None,
) -> Callable[..., Any]:
    """Sharded, jitted `hooks.run_with_hooks`: `run(params, tokens, **model_kwargs)`.

    Returns (output, {hook name: value}); captured values are batch-sharded like the logits.
    Interventions are closed over (they are functions), so a new set needs a new call here.
    """
    shardings = param_shardings(model, mesh, rules) if params_sharding is None else params_sharding
    capture = list(hooks.resolve(model, capture)) if capture else []
    hooks.resolve(model, list(interventions or {}))  # Fail early on unknown names.

    def run(params, tokens, **model_kwargs):
        return hooks.run_with_hooks(
            model,
            params,
            tokens,
            capture=capture,
            interventions=interventions,
            **model_kwargs,
        )

    return sharded_jit(run, mesh, rules, params_sharding=shardings)


# ----------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> None:
    """`jax.distributed.initialize`, tolerant of single-process runs.

    Call before any other JAX use. With no arguments, a cluster JAX can detect (TPU pod,
    SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS set) is joined; otherwise this is a no-op
    (one process). Calling it again after a successful initialization is a no-op.

    Args:
      coordinator: 'host:port' of process 0's coordinator service.
      num_processes: Number of processes.
      process_id: This process's index in 0..num_processes-1.
      **kwargs: Passed to `jax.distributed.initialize` (e.g. local_device_ids).
    """
    if jax.distributed.is_initialized():
        return
    explicit = not (coordinator is None and num_processes is None and process_id is None)
    if not explicit and not kwargs:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            # ValueError: no cluster detected; RuntimeError: JAX is already in use here.
            logging.info("Running as a single process (%s).", error)
            return
    elif num_processes == 1 and coordinator is None:
        return
    else:
        if coordinator is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            logging.info("No coordinator given; relying on cluster auto-detection.")
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def process_allgather(tree: Any) -> Any:
    """The full value of each (possibly multi-host sharded) array as NumPy, on every process.

    Wraps `multihost_utils.process_allgather(..., tiled=True)`: without `tiled=True`, arrays
    spread over processes come back stacked per process instead of as the global array.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
