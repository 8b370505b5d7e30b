"""Meshes and logical-axis rules: (logical name, mesh axes) -> `NamedSharding`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    shape = mesh_shape(len(devices), data=data, model=model, fsdp=fsdp)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_shape(count: int, data: int = -1, model: int = 1, fsdp: int = 1) -> tuple[int, ...]:
    """The (data, fsdp, model) sizes `make_mesh` gives on `count` devices, without devices.

    Args:
      count: Number of (global) devices, e.g. a TPU slice's chip count.
      data, model, fsdp: As for `make_mesh`; one of them may be -1.

    Returns:
      The sizes in `MESH_AXES` order, their product `count`.

    Raises:
      ValueError: naming the sizes and the device count when they do not fit.
    """
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
    return tuple(int(sizes[name]) for name in MESH_AXES)


def abstract_mesh(config: Mapping[str, Any] | None, count: int) -> jax.sharding.AbstractMesh:
    """The mesh `mesh_from_config(config)` would build on `count` devices, with no devices.

    What a pod slice's mesh will be, checked on any machine: shardings over it (`NamedSharding`
    accepts an `AbstractMesh`) give each array's per-device shard shape (`shard_shape`), and
    `relaxations` says which dims would not divide. Nothing can run on it.

    Raises:
      ValueError: For unknown fields or sizes that do not fit `count` (as `mesh_from_config`).
    """
    values = dict(config or {})
    unknown = sorted(set(values) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh field(s) {unknown}; valid fields are {MESH_AXES}.")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.AbstractMesh(mesh_shape(count, **values), MESH_AXES, axis_types=auto)


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
    out, notes = _resolve(logical_specs, mesh, rules, shapes)
    _warn_relaxed(notes)
    return out


def relaxations(logical_specs: Any, mesh, rules: Rules, shapes: Any) -> dict[str, list[str]]:
    """Which dims of `shapes` do not divide over the mesh axes their rules give them.

    What `logical_to_sharding` would relax (and warn about), as data: for checking a config
    against a pod slice's mesh (an `abstract_mesh` works here) before running it there.

    Args:
      logical_specs, mesh, rules, shapes: As for `logical_to_sharding` (`shapes` required).

    Returns:
      {array path: ['dim 0 (size 6) over nothing instead of ('model',) (sizes [4])', ...]}
      for every array sharded less than its rules ask; {} when everything divides.
    """
    return _resolve(logical_specs, mesh, rules, shapes)[1]


def _resolve(logical_specs, mesh, rules, shapes):
    """(tree of `NamedSharding`, {path: relaxation notes}) for `logical_to_sharding`."""
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
    return out, notes
