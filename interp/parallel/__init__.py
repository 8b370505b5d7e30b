"""Meshes, logical-axis rules and shardings: the one place that knows about devices.

Model code names axes logically (`nn.with_logical_partitioning` on parameters,
`nn.with_logical_constraint` on activations); this module maps those names to the axes of a
`jax.sharding.Mesh` with `(logical name, mesh axes)` rules and hands out `NamedSharding`s.

    mesh = parallel.make_mesh(data=2, model=4)            # or mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get('rules'))  # None -> DEFAULT_RULES
    params = parallel.init_sharded(Transformer(cfg), jax.random.key(0), mesh, rules)
    forward = parallel.sharded_apply(Transformer(cfg), mesh, rules)
    logits = forward(params, tokens)                        # [B, T, V], batch over data

    # Hooks under jit with sharded params: interp.models.hooks.sharded_run_with_hooks.
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

Pod slices: `SLICES` / `get_slice('v5litepod-16')` describe common TPU slices and GPU nodes
(chips, hosts, memory, runtime version); `abstract_mesh(config.mesh, slice.devices)` and
`relaxations(...)` check a config's mesh and shardings against one on any machine.

Multi-host: call `initialize_distributed` first thing; build the mesh from all (global)
devices; feed every process the same global batch (or see `jax.make_array_from_process_local_data`
for per-process shards); read results with `process_allgather`, which needs `tiled=True` for
arrays spread over processes (it passes it); write files that are not sharded arrays with
`on_main_process` (process 0 writes, every process waits for it).
"""

from interp.parallel.distributed import (
    DistributedInitError,
    initialize_distributed,
    is_main_process,
    on_main_process,
    process_allgather,
)
from interp.parallel.jit import sharded_apply, sharded_jit
from interp.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    abstract_mesh,
    logical_to_sharding,
    make_mesh,
    mesh_from_config,
    mesh_shape,
    relaxations,
    rules_from_config,
)
from interp.parallel.placement import (
    abstract_params,
    batch_sharding,
    init_sharded,
    optimizer_state_shardings,
    param_shardings,
    shard_batch,
    shard_params,
)
from interp.parallel.slices import SLICES, Slice, get_slice

__all__ = [
    "DEFAULT_RULES",
    "DistributedInitError",
    "MESH_AXES",
    "Rules",
    "SLICES",
    "Slice",
    "abstract_mesh",
    "abstract_params",
    "batch_sharding",
    "get_slice",
    "init_sharded",
    "initialize_distributed",
    "is_main_process",
    "logical_to_sharding",
    "make_mesh",
    "mesh_from_config",
    "mesh_shape",
    "on_main_process",
    "optimizer_state_shardings",
    "param_shardings",
    "process_allgather",
    "relaxations",
    "rules_from_config",
    "shard_batch",
    "shard_params",
    "sharded_apply",
    "sharded_jit",
]
