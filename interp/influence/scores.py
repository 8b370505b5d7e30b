"""Influence scores: which training sequences raise a query's measurement, by layer and token.

    scores = pairwise_scores(model, params, factors, queries, train)          # [Q, N]
    detail = pairwise_scores(..., per_layer=True, per_token=True)             # InfluenceScores

Following Grosse et al. 2023 ("Studying Large Language Model Generalization with Influence
Functions", eq. 3 and section 2.3): the influence of training sequence n on a query q is

    score(q, n) = sum over tracked modules of < P(G_q), G_n >

with G_n = sum_t g_t a_t^T the gradient of the sequence's summed NLL, G_q the gradient of minus
the query's measurement (of its completion's NLL for the default log-probability), and P the
damped inverse curvature (`factors.precondition`). Positive means up-weighting n raises the
query's measurement. Per token of the training sequence, g_t^T P(G_q) a_t, which sums over t
to the module's score; per-token scores never form per-token gradient matrices. With `rank`,
each preconditioned query gradient is replaced by its best rank-r approximation U diag(s) V^T
(truncated SVD, as the paper does for many queries), and a token costs (U^T g_t)(V^T a_t).
Legend: Q queries, N training sequences, M tracked modules, B batch, T positions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interp import parallel
from interp.influence import gradients
from interp.influence.factors import (
    Factors,
    apply_inverse,
    per_sequence_gradients,
    precondition,
)
from interp.influence.queries import Measurement


@dataclasses.dataclass
class InfluenceScores:
    """Scores with their breakdowns.

    Attributes:
      total: [Q, N] float32.
      modules: Tracked module names, the order of `per_layer`'s last axis.
      per_layer: [Q, N, M] or None; sums over M to `total`.
      per_token: [Q, N, T] or None (T of the training batches; 0 at padding); sums over T
        to `total`.
    """

    total: np.ndarray
    modules: tuple[str, ...]
    per_layer: np.ndarray | None = None
    per_token: np.ndarray | None = None


def _batches(data: Iterable[Mapping[str, Any]], model, what: str, placement):
    for batch in data:
        yield placement.batch(gradients.check_batch(batch, model.config.max_len, what))


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _query_gradients(model, params, modules, batch, measurement):
    """{module: G_q [Bq, O, I]} of minus the measurement (the NLL by default)."""
    stats = gradients.inputs_and_grads(
        model,
        params,
        batch,
        modules,
        measurement=None if measurement is None else measurement.fn,
        extra_hooks=() if measurement is None else measurement.hooks,
    )
    return {name: per_sequence_gradients(a, g) for name, (a, g) in stats.items()}


def preconditioned_queries(
    model,
    params,
    factors: Factors,
    queries: Iterable[Mapping[str, Any]],
    damping: float | None = None,
    *,
    measurement: Measurement | None = None,
    rank: int | None = None,
    placement: gradients.Placement | None = None,
) -> dict[str, Any]:
    """{module: P(G_q) [Q, O, I]} or, with `rank`, {module: (U*s [Q, O, r], V [Q, I, r])}."""
    grads: dict[str, list[jax.Array]] = {m.name: [] for m in factors.modules}
    placement = placement or gradients.Placement()
    for batch in _batches(queries, model, "query", placement):
        for name, value in _query_gradients(
            model, params, factors.modules, batch, measurement
        ).items():
            grads[name].append(value)
    out = {}
    for name, parts in grads.items():
        if not parts:
            raise ValueError("queries held no sequence; give at least one query batch.")
        preconditioned = precondition(factors, name, jnp.concatenate(parts), damping)
        if not bool(jnp.all(jnp.isfinite(preconditioned))):
            raise ValueError(
                f"The preconditioned query gradient of {name} holds NaN or inf: damping "
                f"{damping} is too small for this curvature (use the default, None)."
            )
        if rank is None:
            out[name] = preconditioned
        else:
            u, s, vt = jnp.linalg.svd(preconditioned, full_matrices=False)
            r = min(rank, s.shape[-1])
            out[name] = (u[..., :r] * s[..., None, :r], jnp.swapaxes(vt[..., :r, :], -1, -2))
    return out


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6))
def _train_scores(model, params, modules, batch, queries, per_token, low_rank):
    """Scores of one training batch: per module [Q, B] and, if asked, per token [Q, B, T]."""
    stats = gradients.inputs_and_grads(model, params, batch, modules)
    per_module, tokens = [], 0.0
    for module in modules:
        a, g = stats[module.name]
        query = queries[module.name]
        if low_rank:
            left, right = query  # [Q, O, r], [Q, I, r]
            contribution = jnp.einsum("qor,bto->qbtr", left, g) * jnp.einsum(
                "qir,bti->qbtr", right, a
            )
            token_scores = contribution.sum(-1)  # [Q, B, T]
            per_module.append(token_scores.sum(-1))
        elif per_token:
            token_scores = jnp.einsum("qoi,bti,bto->qbt", query, a, g)
            per_module.append(token_scores.sum(-1))
        else:
            token_scores = None
            per_module.append(jnp.einsum("qoi,boi->qb", query, per_sequence_gradients(a, g)))
        if per_token:
            tokens = tokens + token_scores
    return jnp.stack(per_module, axis=-1), (tokens if per_token else None)


def pairwise_scores(
    model,
    params: Any,
    factors: Factors,
    queries: Iterable[Mapping[str, Any]],
    train: Iterable[Mapping[str, Any]],
    damping: float | None = None,
    *,
    per_layer: bool = False,
    per_token: bool = False,
    measurement: Measurement | None = None,
    rank: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> np.ndarray | InfluenceScores:
    """Influence of every training sequence on every query.

    Args:
      model, params: The model the factors were fitted for.
      factors: From `fit_factors`.
      queries: Iterable of {'tokens' [B, T], 'loss_mask' [B, T] (1 on the completion's
        tokens), 'attention_mask' (optional)}.
      train: Iterable of training batches, the same dicts (loss_mask optional: all targets).
      damping: Added to the curvature of every module; None: 0.1 x mean(Lambda) per module.
      per_layer: Also return the split over tracked modules.
      per_token: Also return the split over the training sequences' tokens.
      measurement: What the query measures (`queries.py`); default log p(completion).
      rank: Truncate each preconditioned query gradient to this rank (many queries cheaply).
      mesh, rules: Stream the training batches through this mesh (split over 'batch').

    Returns:
      float32 [Q, N], or `InfluenceScores` when `per_layer` or `per_token` is asked for.

    Raises:
      ValueError: For factors of another model, malformed batches, non-finite scores.
    """
    factors.check_model(model, params)
    placement = gradients.Placement.of(mesh, rules)
    params = placement.params(model, params)
    layers, tokens = [], []
    with placement.context():
        prepared = preconditioned_queries(
            model, params, factors, queries, damping, measurement=measurement, rank=rank,
            placement=placement,
        )  # fmt: skip
        for batch in _batches(train, model, "training", placement):
            layer, token = _train_scores(
                model, params, factors.modules, batch, prepared, per_token, rank is not None
            )
            layers.append(parallel.process_allgather(layer))
            if per_token:
                tokens.append(parallel.process_allgather(token))
    if not layers:
        raise ValueError("train held no sequence; give at least one training batch.")
    per_module = np.concatenate(layers, axis=1)  # [Q, N, M]
    total = per_module.sum(-1)
    if not np.all(np.isfinite(total)):
        raise ValueError("Influence scores hold NaN or inf; check the factors and damping.")
    if not (per_layer or per_token):
        return total
    token_scores = None
    if per_token:
        width = max(t.shape[-1] for t in tokens)
        token_scores = np.concatenate(
            [np.pad(t, ((0, 0), (0, 0), (0, width - t.shape[-1]))) for t in tokens], axis=1
        )
    return InfluenceScores(
        total=total,
        modules=tuple(m.name for m in factors.modules),
        per_layer=per_module if per_layer else None,
        per_token=token_scores,
    )


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _self_scores(model, params, modules, batch, strategy, arrays, dampings):
    stats = gradients.inputs_and_grads(model, params, batch, modules)
    total = 0.0
    for module in modules:
        a, g = stats[module.name]
        grad = per_sequence_gradients(a, g)
        inverse = apply_inverse(strategy, arrays[module.name], grad, dampings[module.name])
        total = total + jnp.einsum("boi,boi->b", inverse, grad)
    return total


def self_scores(
    model,
    params: Any,
    factors: Factors,
    data: Iterable[Mapping[str, Any]],
    damping: float | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> np.ndarray:
    """Self-influence <P(G_n), G_n> of each sequence [N] (the diagonal of pairwise scores).

    Raises:
      ValueError: For factors of another model or malformed batches.
    """
    factors.check_model(model, params)
    dampings = {
        m.name: factors.default_damping(m.name) if damping is None else damping
        for m in factors.modules
    }
    placement = gradients.Placement.of(mesh, rules)
    params = placement.params(model, params)
    out = []
    with placement.context():
        for batch in _batches(data, model, "training", placement):
            out.append(parallel.process_allgather(_self_scores(
                model, params, factors.modules, batch, factors.strategy, factors.arrays,
                dampings,
            )))  # fmt: skip
    if not out:
        raise ValueError("data held no sequence; give at least one batch.")
    return np.concatenate(out)
