"""Dry runs of the SAE and influence jobs: a config's model, mesh, shardings and memory, checked
with shapes only (no weights, no data), on any machine, for the slice it will run on.

    model_config = plan.model_config("configs/hf/gemma-2-2b.json")   # the HF config.json
    report = plan.sae_plan(config, model_config, parallel.get_slice("v4-32"))
    print(report.format())        # per-device bytes by part, and what does not divide
    lowered = plan.lower_sae_step(config, model_config, parallel.make_mesh(model=8))

What the jobs hold, and where (so what these plans count):
  * SAE job (`interp.jobs.sae`): the model, float32, unsharded on one device (it harvests
    activations with it, then evaluates with it: it stays there while the SAEs train); the
    SAEs' train state (params, Adam moments, dead-latent counters) laid out by
    `sae.train.state_shardings` (latents over 'model'), its gradients, and the step's
    activations.
  * Influence job (`interp.jobs.influence`): the model laid out by the logical-axis rules,
    batches over the 'batch' mesh axes; the covariance sums of every tracked layer (replicated:
    each device adds its batch's sums), the eigenbases, the eigenvalue-correction sums, and
    the forward + backward activations of the batch.
Array bytes are exact (`NamedSharding.shard_shape` over `parallel.abstract_mesh`). Step
activations are estimates (`ACTIVATION_NOTES`), stated so the README can say why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from interp import parallel
from interp.influence import factors as factors_lib
from interp.influence import gradients
from interp.jobs import sae as sae_job
from interp.models import hooks
from interp.models import sites as sites_lib
from interp.models.config import ModelConfig
from interp.models.hf_config import config_from_hf
from interp.models.transformer import Transformer
from interp.parallel.slices import Slice
from interp.sae import train as sae_train
from interp.sae.modules import SAE, SAEConfig

ACTIVATION_NOTES = {
    "sae step activations": "3 float32 [rows per device, latents per device] arrays per SAE "
    "(pre-activations, their gradient, one top-k temporary)",
    "harvest forward": "one layer's attention logits and probabilities, float32 "
    "[batch, heads, T, T] x 2, plus the residual stream and one MLP hidden [batch, T, F]",
    "fit activations": "forward + backward kept for every layer: attention probabilities "
    "[b, heads, T, T], 4 activations [b, T, D] and 2 MLP hiddens [b, T, F] per layer, the "
    "logits [b, T, V] x 3, and each tracked layer's inputs and output gradients [b, T, I + O]; "
    "plus the per-sequence gradients [b, O, I] of every tracked layer in the correction pass",
}


def model_config(hf_config: str | pathlib.Path | Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` the jobs load for a Hugging Face config.json (a path or the dict).

    float32, as `from_pretrained` loads it by default.
    """
    if not isinstance(hf_config, Mapping):
        hf_config = json.loads(pathlib.Path(hf_config).read_text())
    return config_from_hf(hf_config)


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s (their own `sharding`, or
    `shardings`; no sharding means replicated)."""
    leaves = jax.tree.leaves(tree)
    given = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for leaf, sharding in zip(leaves, given, strict=True):
        sharding = sharding or getattr(leaf, "sharding", None)
        shape = tuple(leaf.shape) if sharding is None else sharding.shard_shape(tuple(leaf.shape))
        total += _nbytes(shape, leaf.dtype)
    return total


@dataclasses.dataclass
class Plan:
    """Where a job's bytes go on one slice.

    Attributes:
      job: 'sae' or 'influence'.
      slice: The slice planned for.
      mesh: {'data': ..., 'fsdp': ..., 'model': ...}.
      device0: Bytes on the busiest device, by part ('model params', 'sae state', ...).
      relaxed: Arrays the rules could not split as asked on this mesh ({path: notes}, see
        `parallel.relaxations`): {} when every sharded dim divides.
      notes: Human-readable lines (sizes, counts, estimates).
    """

    job: str
    slice: Slice
    mesh: dict[str, int]
    device0: dict[str, int]
    relaxed: dict[str, list[str]]
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(self.device0.values())

    def fits(self, fraction: float = 0.9) -> bool:
        """Whether the busiest device's bytes stay under `fraction` of its memory (XLA needs
        the rest for its own buffers and fragmentation)."""
        return self.total <= fraction * self.slice.hbm_bytes

    def format(self) -> str:
        lines = [f"{self.job} on {self.slice.name}, mesh {self.mesh}:"]
        for part, size in self.device0.items():
            lines.append(f"  {part:<28} {size / 1e9:8.2f} GB")
        lines.append(f"  {'total (busiest device)':<28} {self.total / 1e9:8.2f} GB of "
                     f"{self.slice.hbm_bytes / 1e9:.1f} GB")  # fmt: skip
        lines += [f"  {note}" for note in self.notes]
        for path, what in self.relaxed.items():
            lines.append(f"  not divisible: {path}: {'; '.join(what)}")
        return "\n".join(lines)


def _mesh_dict(mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


@functools.lru_cache(maxsize=16)
def _boxed_params(model_config: ModelConfig):
    return parallel.abstract_params(Transformer(model_config))


def _model_params(model: Transformer):
    boxed = _boxed_params(model.config)
    return boxed, nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=64)
def _site_width(model_config: ModelConfig, site: str) -> int:
    """Row width of a hook site (`sites.to_rows`), from shapes only; checks the name."""
    model = Transformer(model_config)
    (name,) = hooks.resolve(model, [site])

    def capture(params, tokens):
        _, acts = hooks.run_with_hooks(model, params, tokens, capture=[name])
        return sites_lib.to_rows(name, acts[name])

    _, shapes = _model_params(model)
    return int(jax.eval_shape(capture, shapes, jax.ShapeDtypeStruct((1, 2), jnp.int32)).shape[-1])


def sae_configs(config, model_config: ModelConfig) -> tuple[SAEConfig, ...]:
    """The `SAEConfig`s the SAE job would train for `config` on this model (input_scale 1)."""
    configs = []
    for entry in sae_job._entries(config.sae):  # The job's own reading of config.sae.
        fields = {k: v for k, v in entry.items() if k != "site"}
        width = _site_width(model_config, entry["site"])
        if entry.get("hook_head_index") is not None:
            width = model_config.head_dim
        configs.append(SAEConfig.from_dict(fields | {"d_in": width, "hook_name": entry["site"]}))
    return tuple(configs)


def _batch_relaxations(rows: int, mesh, rules) -> dict[str, list[str]]:
    """The global batch must split over the batch mesh axes as the rules ask."""
    shape = jax.ShapeDtypeStruct((rows,), jnp.float32)
    notes = parallel.relaxations(("batch",), mesh, rules, shape)
    return {f"batch of {rows}": what for what in notes.values()}


def _sae_relaxations(configs, mesh, rules, rows: int) -> dict[str, list[str]]:
    found = _batch_relaxations(rows, mesh, rules)
    for i, cfg in enumerate(configs):
        sample = jax.ShapeDtypeStruct((1, cfg.d_in), jnp.float32)
        with nn.logical_axis_rules(()):
            boxed = jax.eval_shape(SAE(cfg).init, jax.random.key(0), sample)["params"]
        notes = parallel.relaxations(nn.get_partition_spec(boxed), mesh, rules,
                                     nn.meta.unbox(boxed))  # fmt: skip
        found.update({f"sae{i}/{path}": what for path, what in notes.items()})
    return found


def sae_plan(config, model_config: ModelConfig, slice_: Slice) -> Plan:
    """The SAE job's bytes on the busiest device of `slice_` (see the module docstring).

    Raises:
      ValueError: for a mesh that does not fit the slice, unknown config fields or sites.
    """
    mesh = parallel.abstract_mesh(config.mesh, slice_.devices)
    rules = parallel.rules_from_config(config.get("rules") or None)
    train_config = sae_train.as_train_config(config.sae.train, where="config.sae.train")
    configs = sae_configs(config, model_config)
    state = sae_train.abstract_state(configs, train_config, mesh, rules)
    params_only = [s["params"] for s in state["saes"]]
    model = Transformer(model_config)
    _, model_shapes = _model_params(model)
    batch_split = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    rows = math.ceil(train_config.batch_size / batch_split)
    acts = sum(3 * rows * math.ceil(c.num_latents / mesh.shape["model"]) * 4 for c in configs)
    seq, batch = config.data.seq_len, config.sae.harvest_batch_size
    harvest = 4 * batch * seq * (2 * model_config.num_heads * seq + 2 * model_config.d_model
                                 + model_config.mlp_dim)  # fmt: skip
    model_bytes = per_device_bytes(model_shapes)
    device0 = {
        "model params (float32)": model_bytes,
        "harvest forward (est.)": harvest,
        "sae state": per_device_bytes(state),
        "sae gradients": per_device_bytes(params_only),
        "sae step activations (est.)": acts,
    }
    latents = sum(c.num_latents for c in configs)
    sae_params = sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(params_only))
    notes = [
        f"{len(configs)} SAEs, {latents:,} latents in all, d_in {configs[0].d_in}; "
        f"params {sae_params / 1e9:.1f} GB, state with Adam {3 * sae_params / 1e9:.1f} GB "
        f"over {mesh.shape['model']}-way 'model'",
        f"{rows} rows per device per step ({train_config.batch_size} over {batch_split})",
        "the harvest forward runs before training; it is counted as if it overlapped",
    ]
    return Plan("sae", slice_, _mesh_dict(mesh), device0,
                _sae_relaxations(configs, mesh, rules, train_config.batch_size), notes)  # fmt: skip


def _abstract_with(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def lower_sae_step(config, model_config: ModelConfig, mesh) -> jax.stages.Lowered:
    """Lowers the SAE job's jitted train step for `config` on a real `mesh` (e.g. 8 CPU
    devices): the shardings, shapes and collectives are built, nothing is allocated."""
    rules = parallel.rules_from_config(config.get("rules") or None)
    train_config = sae_train.as_train_config(config.sae.train, where="config.sae.train")
    fields = sae_train._optimizer_fields(train_config)
    # dead_tokens=None resolved for this run, as make_train_step does.
    configs = sae_train.resolve_dead_tokens(sae_configs(config, model_config), train_config)
    shapes = tuple((train_config.batch_size, c.d_in) for c in configs)
    jitted, batch_shardings = sae_train._compiled_step(configs, fields, mesh, rules, shapes)
    state = sae_train.abstract_state(configs, train_config, mesh, rules)
    batches = tuple(jax.ShapeDtypeStruct(s, jnp.float32, sharding=b)
                    for s, b in zip(shapes, batch_shardings, strict=True))  # fmt: skip
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(state, batches)


def _influence_parts(config, model_config: ModelConfig, mesh):
    rules = parallel.rules_from_config(config.get("rules") or None)
    model = Transformer(model_config)
    boxed, shapes = _model_params(model)
    shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes)
    relaxed = parallel.relaxations(nn.get_partition_spec(boxed), mesh, rules, shapes)
    modules = gradients.tracked_modules(model, list(config.influence.modules) or None)
    return rules, model, shapes, shardings, relaxed, modules


def _layer_dims(model_config, modules, shapes) -> dict[str, tuple[int, int]]:
    """{module: (I, O)}, I counting the bias column."""
    dims = {}
    for m in modules:
        kernel = shapes
        for key in m.kernel:
            kernel = kernel[key]
        dims[m.name] = (kernel.shape[0] + (m.bias is not None), kernel.shape[1])
    return dims


def influence_plan(config, model_config: ModelConfig, slice_: Slice) -> Plan:
    """The influence job's bytes on the busiest device of `slice_` (see the module docstring).

    Raises:
      ValueError: for a mesh that does not fit the slice, unknown modules.
    """
    mesh = parallel.abstract_mesh(config.mesh, slice_.devices)
    rules, model, shapes, shardings, relaxed, modules = _influence_parts(config, model_config, mesh)
    dims = _layer_dims(model_config, modules, shapes)
    batch_split = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    b = math.ceil(config.influence.batch_size / batch_split)
    t, c = config.data.seq_len, model_config
    covariances = sum(i * i + o * o for i, o in dims.values()) * 4
    corrections = sum(i * o for i, o in dims.values()) * 4
    per_layer = b * t * (c.num_heads * t + 4 * c.d_model + 2 * c.mlp_dim) * 4
    activations = (c.num_layers * per_layer + 3 * b * t * c.vocab_size * 4
                   + b * t * sum(i + o for i, o in dims.values()) * 4)  # fmt: skip
    device0 = {
        "model params (float32)": per_device_bytes(shapes, shardings),
        "covariance sums (x2)": 2 * covariances,
        "correction sums (x2) (est.)": 2 * corrections + b * corrections,
        "fit activations (est.)": activations,
    }
    notes = [
        f"{len(modules)} tracked layers; factors on disk {(covariances + corrections) / 1e9:.1f}"
        f" GB (A, S, Lambda; float32); {b} sequences of {t} tokens per device per batch",
        "covariance and correction passes do not overlap; both are counted (an upper bound)",
    ]
    relaxed = relaxed | _batch_relaxations(config.influence.batch_size, mesh, rules)
    return Plan("influence", slice_, _mesh_dict(mesh), device0, relaxed, notes)


def lower_influence(config, model_config: ModelConfig, mesh) -> jax.stages.Lowered:
    """Lowers the influence job's covariance pass (`factors._covariance_sums`, one jitted
    forward + backward with captures and hook gradients of every tracked layer) for one
    batch of `config.influence.batch_size` rows on a real `mesh`; nothing is allocated."""
    rules, model, shapes, shardings, _, modules = _influence_parts(config, model_config, mesh)
    params = _abstract_with(shapes, shardings)
    rows, seq = config.influence.batch_size, config.data.seq_len
    batch_sharding = parallel.batch_sharding(mesh, rules, 2, (rows, seq))
    batch = {
        name: jax.ShapeDtypeStruct((rows, seq), dtype, sharding=batch_sharding)
        for name, dtype in (("tokens", jnp.int32), ("attention_mask", jnp.int32),
                            ("loss_mask", jnp.float32))
    }  # fmt: skip
    key = jax.random.key(0) if config.influence.sample_labels else None
    placement = gradients.Placement.of(mesh, rules)
    with placement.context():
        return factors_lib._covariance_sums.lower(model, params, modules, batch, key)


__all__ = [
    "ACTIVATION_NOTES",
    "Plan",
    "influence_plan",
    "lower_influence",
    "lower_sae_step",
    "model_config",
    "per_device_bytes",
    "sae_configs",
    "sae_plan",
]
