"""Training sparse autoencoders: state, optimizer, a sharded step for several SAEs at once.

    configs = (SAEConfig(architecture="topk", d_in=768, num_latents=32768, k=32, input_scale=s),
               SAEConfig(architecture="topk", d_in=768, num_latents=32768, k=64, input_scale=s))
    state = init_state(configs, train_config, jax.random.key(0), mesh, rules, b_dec_init=median)
    step = make_train_step(configs, train_config, mesh, rules)
    state, metrics = step(state, x)              # x [B, D] raw activations, shared by the SAEs
    # or step(state, (x_a, x_b)): one batch per SAE (e.g. different hook sites)

    # Checkpoints, metrics, exact resume: the SAE job runs `init_state` / `make_train_step`
    # through the shared loop (interp/jobs/sae.py, interp/jobs/loop.py).

The state is a plain pytree, everything a resume needs:

    {"step": int32 [],                           # optimizer steps done
     "saes": ({"params": {...},                  # SAE(config) params, latents over 'model'
               "opt_state": ...,                 # optax state, laid out like the params
               "tokens_since_fired": int32 [X]}, # saturating at config.dead_tokens
              ...)}                              # one entry per config, same order

A config's `dead_tokens=None` is resolved from the run's length (`resolve_dead_tokens`), and
settings that leave a loss term inert (AuxK that can never see a dead latent, a zero sparsity
coefficient) are logged as warnings when the step is built (`inert_terms`).

Conventions: inputs are scaled by `config.input_scale` to unit mean squared norm, E||x||^2 = 1
(`input_scale_for` computes it from a sample, the activation cache stores it per site; the
Anthropic April 2024 recipe scales to E||x||^2 = D, so its L1 coefficient is sqrt(D) times
ours), and `b_dec` starts at the
geometric median of a sample (OpenAI; `geometric_median`). Each SAE has its own optimizer
state and gradient clipping, so training several together gives what training each alone does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from interp import checkpoint, parallel, records
from interp.data import activations
from interp.sae import losses, modules
from interp.sae.modules import SAE, SAEConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the SAEs trained together.

    A mapping (an ml_collections ConfigDict) with some of these fields works in its place
    (`as_train_config`); a field it does not have is an error, not a default.

    Attributes:
      steps: Optimizer steps in the run.
      batch_size: Activation rows per step (global), what the SAE job reads per step.
      schedule_steps: Length of the learning-rate schedule (the decay reaches 0 there);
        0 = `steps`. Set it to train longer or shorter along the same schedule.
      learning_rate: Peak Adam learning rate.
      warmup_steps: Linear warm-up from 0.
      lr_decay: 'cosine' or 'linear' decay to 0 by `steps`, or 'constant'.
      decay_start: Fraction of the run after which the decay starts (Anthropic: 0.8); before
        it the rate stays at its peak. 0 decays right after the warm-up.
      grad_clip: Global-norm clipping per SAE; 0 disables it.
      adam_b1, adam_b2, adam_eps: Adam's constants.
      log_every: Steps between metric writes (the SAE job's loop).
      checkpoint_every: Steps between checkpoints (the SAE job's loop); the last step too.
      keep_checkpoints: How many checkpoints to keep.
    """

    steps: int = 1000
    batch_size: int = 4096
    learning_rate: float = 4e-4
    warmup_steps: int = 100
    lr_decay: str = "linear"
    decay_start: float = 0.8
    grad_clip: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    schedule_steps: int = 0

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps or self.steps


Configs = Sequence[SAEConfig]


def _as_tuple(configs) -> tuple[SAEConfig, ...]:
    return (configs,) if isinstance(configs, SAEConfig) else tuple(configs)


def as_train_config(train_config, where: str | None = None) -> TrainConfig:
    """A `TrainConfig` from itself or a mapping (ConfigDict) of some of its fields.

    Fields the mapping leaves out take the dataclass defaults; `where` names the config
    section in errors (`config.sae.train`).

    Raises:
      ValueError: Naming every field `TrainConfig` does not have (a typo such as
        `learning_rte` would otherwise train at the default rate).
    """
    if isinstance(train_config, TrainConfig):
        return train_config
    return records.from_dict(TrainConfig, train_config, where=where)


def _optimizer_fields(train_config) -> TrainConfig:
    """Only the fields the optimizer and step depend on (a cache key: logging does not count)."""
    defaults = TrainConfig()
    names = ("log_every", "checkpoint_every", "keep_checkpoints", "batch_size")
    return dataclasses.replace(
        as_train_config(train_config), **{n: getattr(defaults, n) for n in names}
    )


def _rules(rules):
    return parallel.rules_from_config(rules)


# Gao et al. (2024, sec. A.2) count a latent dead once it has not fired in 10M tokens, a
# sliver of their runs (billions of tokens). A run shorter than that window never has a dead
# latent, so AuxK never acts: the default window is a fraction of the run, capped there.
DEAD_TOKENS_FRACTION = 0.1
DEAD_TOKENS_CAP = 10_000_000


def resolve_dead_tokens(configs: SAEConfig | Configs, train_config) -> tuple[SAEConfig, ...]:
    """The configs with `dead_tokens=None` set for this run: a tenth of its tokens (schedule
    length x batch size, fixed for a run and its resumes), at most 10M (Gao et al. 2024).
    Explicit values are kept."""
    train_config = as_train_config(train_config)
    total = train_config.schedule_length * train_config.batch_size
    window = max(1, min(DEAD_TOKENS_CAP, int(total * DEAD_TOKENS_FRACTION)))
    return tuple(
        c if c.dead_tokens is not None else c.replace(dead_tokens=window)
        for c in _as_tuple(configs)
    )


def inert_terms(configs: SAEConfig | Configs, train_config) -> list[str]:
    """Why a loss term of these settings does nothing (or never reaches its value) in this
    run, one sentence per term: [] when every term acts. Logged as warnings when training
    starts (`make_train_step`).
    """
    train_config = as_train_config(train_config)
    steps, batch = train_config.steps, train_config.batch_size
    found = []
    for index, config in enumerate(resolve_dead_tokens(configs, train_config)):
        name = f"SAE {index} ({config.architecture})"
        if losses.uses_auxk(config) and (steps - 1) * batch < config.dead_tokens:
            found.append(
                f"{name}: AuxK never acts: a latent counts as dead after {config.dead_tokens:,} "
                f"tokens without firing, but the run trains on {steps * batch:,} "
                f"({steps} steps x {batch}). Lower dead_tokens (None scales it with the run) "
                "or set auxk_alpha=0 to say it is off."
            )
        if config.architecture in ("relu", "jumprelu"):
            what = "L1" if config.architecture == "relu" else "L0"
            if config.l1_coefficient == 0:
                found.append(
                    f"{name}: l1_coefficient=0 switches the {what} sparsity penalty off: "
                    "nothing makes the codes sparse."
                )
            elif config.l1_warmup_steps > steps:
                found.append(
                    f"{name}: l1_warmup_steps={config.l1_warmup_steps} is longer than the run "
                    f"({steps} steps): the {what} penalty never reaches l1_coefficient="
                    f"{config.l1_coefficient:g} (at most {steps / config.l1_warmup_steps:.0%})."
                )
    if train_config.learning_rate == 0:
        found.append("learning_rate=0: no parameter changes; nothing is trained.")
    return found


# ----------------------------------------------------------------------------- data helpers


def input_scale_for(x) -> float:
    """The factor s with E||s * x||^2 = 1 over the sample x [N, D] (what caches store)."""
    return activations.unit_norm_scale(activations.mean_squared_norm(x))


@functools.partial(jax.jit, static_argnames="iters")
def geometric_median(x, iters: int = 100, eps: float = 1e-8) -> jax.Array:
    """The point [D] minimising the summed distances to the rows of x [N, D] (Weiszfeld).

    Starts at the mean; each iteration re-weights the rows by their inverse distance.
    """
    x = jnp.asarray(x, jnp.float32)

    def body(_, y):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
        return weights @ x / weights.sum()

    return jax.lax.fori_loop(0, iters, body, x.mean(0))


# ----------------------------------------------------------------------------- optimizer


def make_schedule(train_config) -> optax.Schedule:
    """Linear warm-up to the peak, flat until `decay_start`, then linear/cosine decay to 0.

    The decay ends at `schedule_length` (`schedule_steps`, or `steps` when that is 0).
    """
    train_config = as_train_config(train_config)
    steps, warmup = train_config.schedule_length, train_config.warmup_steps
    peak = train_config.learning_rate
    decay_from = max(warmup, int(train_config.decay_start * steps))
    decay_steps = max(steps - decay_from, 1)
    if train_config.lr_decay == "constant":
        decay = optax.constant_schedule(peak)
    elif train_config.lr_decay == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif train_config.lr_decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise ValueError(f"lr_decay must be 'cosine', 'linear' or 'constant', got "
                         f"{train_config.lr_decay!r}.")  # fmt: skip
    pieces = [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)]
    pieces.append(decay)
    return optax.join_schedules(pieces, [warmup, decay_from])


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Adam (no weight decay) on `make_schedule`, after global-norm clipping."""
    train_config = as_train_config(train_config)
    adam = optax.adam(
        make_schedule(train_config),
        b1=train_config.adam_b1,
        b2=train_config.adam_b2,
        eps=train_config.adam_eps,
    )
    if not train_config.grad_clip:
        return adam
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adam)


# ----------------------------------------------------------------------------- state


def _abstract_params(config: SAEConfig):
    """The boxed (logically partitioned) params of `SAE(config)`, as shapes."""
    sample = jax.ShapeDtypeStruct((1, config.d_in), jnp.float32)
    # No rules while tracing: flax would otherwise constrain the boxed params themselves.
    with nn.logical_axis_rules(()):
        return jax.eval_shape(SAE(config).init, jax.random.key(0), sample)["params"]


def param_shardings(config: SAEConfig, mesh: Mesh, rules=parallel.DEFAULT_RULES) -> Any:
    """`NamedSharding`s of `SAE(config)`'s params from its logical axes (latent over model)."""
    boxed = _abstract_params(config)
    return parallel.logical_to_sharding(
        nn.get_partition_spec(boxed), mesh, rules, shapes=nn.meta.unbox(boxed)
    )


def _sae_state_shardings(config, optimizer, mesh, rules):
    params = param_shardings(config, mesh, rules)
    shapes = nn.meta.unbox(_abstract_params(config))
    opt_state = parallel.optimizer_state_shardings(optimizer, shapes, params, mesh)
    counters = parallel.logical_to_sharding(
        PartitionSpec("latent"), mesh, rules,
        shapes=jax.ShapeDtypeStruct((config.num_latents,), jnp.int32),
    )  # fmt: skip
    return {"params": params, "opt_state": opt_state, "tokens_since_fired": counters}


def state_shardings(configs, train_config, mesh: Mesh, rules=parallel.DEFAULT_RULES) -> Any:
    """The `NamedSharding` tree of the train state of `configs`."""
    optimizer = make_optimizer(train_config)
    saes = tuple(_sae_state_shardings(c, optimizer, mesh, rules) for c in _as_tuple(configs))
    return {"step": NamedSharding(mesh, PartitionSpec()), "saes": saes}


def _init_one(config, optimizer, key, b_dec):
    params = modules.init_params(config, key, b_dec=b_dec)
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "tokens_since_fired": jnp.zeros((config.num_latents,), jnp.int32),
    }


def _b_dec_list(b_dec_init, count):
    if b_dec_init is None or (not isinstance(b_dec_init, (list, tuple)) and count >= 1):
        return [b_dec_init] * count
    if len(b_dec_init) != count:
        raise ValueError(f"b_dec_init has {len(b_dec_init)} entries for {count} SAEs.")
    return list(b_dec_init)


def init_state(
    configs: SAEConfig | Configs,
    train_config,
    key: jax.Array,
    mesh: Mesh,
    rules=parallel.DEFAULT_RULES,
    b_dec_init=None,
) -> dict[str, Any]:
    """A fresh train state, built directly in its sharded layout.

    Args:
      configs: One SAEConfig or a sequence of them.
      train_config: A `TrainConfig` (or ConfigDict with its fields).
      key: PRNG key; every SAE uses the same one, so SAEs of one shape start identical (a
        controlled comparison across k, say) and a set trained together matches each alone.
      mesh, rules: Mesh and logical-axis rules.
      b_dec_init: None, a [D] raw-activation vector for every SAE (e.g. `geometric_median`),
        or a sequence with one (or None) per SAE.

    Returns:
      The state pytree (see the module docstring).
    """
    configs = resolve_dead_tokens(configs, train_config)
    b_decs = tuple(None if b is None else np.asarray(b, np.float32)
                   for b in _b_dec_list(b_dec_init, len(configs)))  # fmt: skip
    init = _compiled_init(configs, _optimizer_fields(train_config), mesh, _rules(rules))
    with jax.set_mesh(mesh):
        return init(np.asarray(jax.random.key_data(key)), jax.random.key_impl(key), b_decs)


@functools.lru_cache(maxsize=16)
def _compiled_init(configs, train_config, mesh, rules):
    """The jitted initialiser (cached: a resumed or repeated run in one process reuses it)."""
    optimizer = make_optimizer(train_config)
    shardings = state_shardings(configs, train_config, mesh, rules)
    jitted = {}

    def init(raw_key, impl, b_decs):
        if impl not in jitted:

            def build(raw_key, b_decs):
                key = jax.random.wrap_key_data(raw_key, impl=impl)
                saes = tuple(
                    _init_one(c, optimizer, key, b) for c, b in zip(configs, b_decs, strict=True)
                )
                return {"step": jnp.zeros((), jnp.int32), "saes": saes}

            jitted[impl] = jax.jit(build, out_shardings=shardings)
        return jitted[impl](raw_key, b_decs)

    return init


def abstract_state(configs, train_config, mesh: Mesh, rules=parallel.DEFAULT_RULES) -> Any:
    """`ShapeDtypeStruct`s with shardings of the state: the target to restore a checkpoint."""
    configs = resolve_dead_tokens(configs, train_config)
    optimizer = make_optimizer(train_config)

    def init(key):
        saes = tuple(_init_one(c, optimizer, key, None) for c in configs)
        return {"step": jnp.zeros((), jnp.int32), "saes": saes}

    shapes = jax.eval_shape(init, jax.random.key(0))
    return checkpoint.abstract_like(shapes, state_shardings(configs, train_config, mesh, rules))


# ----------------------------------------------------------------------------- step


def _sae_step(config, optimizer, sae_state, x, step):
    """One SAE's update on x [B, D]; returns (new SAE state, metrics)."""
    params = sae_state["params"]
    counters = sae_state["tokens_since_fired"]
    dead = counters >= config.dead_tokens

    def loss_and_grads(dead_mask):
        def loss_fn(params):
            loss, scalars, aux = losses.sae_forward(
                config, params, x, step=step, dead_mask=dead_mask
            )
            return loss, (scalars, aux)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    if losses.uses_auxk(config):
        # AuxK's work only while some latent is dead; the branch is outside the gradient, so
        # the usual step carries no zero-filled AuxK gradients (see losses._auxk_loss).
        (_, (scalars, aux)), grads = jax.lax.cond(
            jnp.any(dead), lambda: loss_and_grads(dead), lambda: loss_and_grads(None)
        )
    else:
        (_, (scalars, aux)), grads = loss_and_grads(None)
    grads = losses.constrain_grads(config, grads, params)
    updates, opt_state = optimizer.update(grads, sae_state["opt_state"], params)
    params = losses.constrain_params(config, optax.apply_updates(params, updates), aux, step)
    # Tokens since each latent last fired, saturating at the window (no int32 overflow).
    counters = jnp.where(aux["fired"], 0, jnp.minimum(counters + x.shape[0], config.dead_tokens))
    scalars = dict(scalars)
    scalars["grad_norm"] = optax.tree.norm(grads)
    scalars["dead_fraction"] = jnp.mean(counters >= config.dead_tokens)
    if "batch_threshold" in aux:
        scalars["threshold"] = params["threshold"][0]
    new_state = {"params": params, "opt_state": opt_state, "tokens_since_fired": counters}
    return new_state, scalars


def make_train_step(
    configs: SAEConfig | Configs,
    train_config,
    mesh: Mesh,
    rules=parallel.DEFAULT_RULES,
) -> Callable[[Any, Any], tuple[Any, tuple[dict[str, jax.Array], ...]]]:
    """A jitted step training every SAE of `configs` on one batch, state donated.

    `step(state, x)`: x is one [B, D] array of raw activations shared by all SAEs, or a
    sequence of arrays, one per SAE (different hook sites; batch sizes may differ). Batches
    are sharded over the 'batch' mesh axes, latents over 'model'; the state keeps its layout
    (explicit in/out shardings) and its buffers are donated, so do not reuse the argument.

    Returns:
      step(state, x) -> (state, metrics), metrics a tuple of dicts of float32 scalars, one
      per SAE (see `flatten_metrics`): those of `losses.sae_loss` plus 'grad_norm',
      'dead_fraction', 'learning_rate' and, for batchtopk, 'threshold'.
    """
    for problem in inert_terms(configs, train_config):
        logging.warning("%s", problem)
    configs = resolve_dead_tokens(configs, train_config)
    rules = _rules(rules)
    fields = _optimizer_fields(train_config)

    def call(state, x):
        batches = tuple(x) if isinstance(x, (list, tuple)) else (x,) * len(configs)
        if len(batches) != len(configs):
            raise ValueError(f"Got {len(batches)} batches for {len(configs)} SAEs.")
        for config, batch in zip(configs, batches, strict=True):
            if np.ndim(batch) != 2 or np.shape(batch)[-1] != config.d_in:
                raise ValueError(
                    f"Expected a [B, {config.d_in}] batch, got shape {np.shape(batch)}."
                )
        shapes = tuple(tuple(np.shape(b)) for b in batches)
        jitted, batch_shardings = _compiled_step(configs, fields, mesh, rules, shapes)
        # Traced under the mesh and the rules, so the logical constraints take effect.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            placed = tuple(
                b if isinstance(b, jax.Array) and b.sharding == s else jax.device_put(b, s)
                for b, s in zip(batches, batch_shardings, strict=True)
            )
            return jitted(state, placed)

    return call


@functools.lru_cache(maxsize=16)
def _compiled_step(configs, train_config, mesh, rules, shapes):
    """The jitted step for one set of batch shapes (cached across `make_train_step` calls)."""
    optimizer = make_optimizer(train_config)
    schedule = make_schedule(train_config)
    shardings = state_shardings(configs, train_config, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step_fn(state, batches):
        step = state["step"]
        saes, all_metrics = [], []
        for config, sae_state, x in zip(configs, state["saes"], batches, strict=True):
            new, scalars = _sae_step(config, optimizer, sae_state, x, step)
            scalars["learning_rate"] = schedule(step)
            saes.append(new)
            all_metrics.append(scalars)
        return {"step": step + 1, "saes": tuple(saes)}, tuple(all_metrics)

    batch_shardings = tuple(parallel.batch_sharding(mesh, rules, 2, s) for s in shapes)
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    return jitted, batch_shardings


def flatten_metrics(
    per_sae: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, float]:
    """{'name/metric': float}; with one SAE and no names, just {'metric': float}."""
    if names is None:
        if len(per_sae) == 1:
            return {k: float(v) for k, v in per_sae[0].items()}
        names = [f"sae{i}" for i in range(len(per_sae))]
    return {f"{n}/{k}": float(v) for n, m in zip(names, per_sae, strict=True) for k, v in m.items()}
