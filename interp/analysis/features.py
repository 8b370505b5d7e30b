"""Per-feature statistics of an SAE over a token stream: density, maxima, quantiles, top contexts.

Legend: B batch, T positions, N = B * T tokens of a batch, X latents (features), K top
contexts kept per feature, W tokens in a context window, Q quantile levels, M histogram bins.

    stats = feature_stats(model, params, sae, sae_params, batches, top_k=20)
    stats.density[f], stats.max[f], stats.quantiles[f], stats.contexts(f)
    search_features(model, params, sae, sae_params, tokens)  # what fires on this text

The SAE reads the site's per-token rows (`interp.models.sites.to_rows`), the layout `harvest`
gives and SAEs are trained on, at the positions `interp.data.activations.keep_mask` keeps
(`bos_id`, `skip_first`, `exclude_ids`: pass the values the SAE was trained with, as for
`interp.sae.evaluate`). The SAE is used only as a Flax module (`encode`) and its config; this
room does not import `interp.sae`.

Streaming: one jitted step per batch updates on-device accumulators; nothing keeps all
activations. Per batch the step holds [N, X] arrays a few times over (the codes, their
transpose for the top-k, histogram bin indices and increments, masks): budget about
N * X * 20 bytes and pick the batch size for the SAE (4096 tokens x 32768 latents: about
2.7 GB). The accumulators themselves take
    X * (4 + 4 * M + 12 * K + 8 * K * W) bytes
(max; histogram int32; top values, rows, positions; window tokens and activations): with
X = 32768, M = 256, K = 20, W = 13, about 110 MB. Histogram counts are int32 on device (exact
up to 2**31 tokens in one bin); fire counts and sums of activations come back to the host each
batch (X int32 + X float32) and are summed there in 64 bits.

Quantiles come from a histogram with fixed, log-spaced bins over `histogram_range`: a quantile
is reported as the geometric centre of the bin it falls in (clipped to the feature's max), so
its relative error is at most half a bin, a factor sqrt(hi / lo) ** (1 / M) (about 3 % with the
defaults: 256 bins over 1e-3 .. 1e4). Activations below the range count in the first bin,
above it in the last. Quantiles are of the activation where the feature fires (code > 0), as
Neuronpedia shows them.

Top contexts: each batch's `jax.lax.top_k` over the batch's positions, per feature, merged with
the running best K by another top-k; each kept entry carries its global row (rows counted
over the stream from 0), position, the token window around it and the feature's activation on
every token of that window (for highlighting). Only positive activations are kept; a feature
with fewer than K such tokens has entries with row -1 at the end.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from interp import paths
from interp.data import activations
from interp.models import hooks, sites

QUANTILES = (0.5, 0.9, 0.99)
# A search score above 1 + this is above the feature's recorded maximum, not rounding.
_ABOVE_MAX_TOLERANCE = 1e-4
HISTOGRAM_RANGE = (1e-3, 1e4)
NUM_BINS = 256


# Where an SAE reads, resolved and checked: one definition shared with SAE evaluation.
Site = activations.SaeSite
resolve_site = activations.resolve_sae_site


def check_features(features, num_latents: int) -> np.ndarray:
    """`features` as an int array, each checked to be in 0..num_latents-1.

    Raises:
      ValueError: naming the first index outside the SAE.
    """
    features = np.asarray(features)
    if features.dtype.kind not in "iu":
        raise ValueError(f"Feature indices must be integers; got dtype {features.dtype}.")
    bad = features[(features < 0) | (features >= num_latents)]
    if bad.size:
        raise ValueError(
            f"Feature {int(bad.flat[0])} is outside this SAE, whose features are "
            f"0..{num_latents - 1}."
        )
    return features


# --- Codes at a site --------------------------------------------------------------------------


def _codes(model, sae, site, params, sae_params, tokens, mask):
    """The SAE's codes [B, T, X] (float32) at the site's rows."""
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=[site.name], attention_mask=mask)
    rows = sites.to_rows(site.name, acts[site.name], site.head_index)
    return sae.apply({"params": sae_params}, rows, method="encode").astype(jnp.float32)


_jit_codes = jax.jit(_codes, static_argnums=(0, 1, 2))


# --- Accumulation -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static shape of the accumulators."""

    top_k: int
    before: int
    after: int
    num_bins: int
    log_lo: float
    log_hi: float

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


def _init_state(num_latents: int, s: _Settings) -> dict[str, jax.Array]:
    x, k, w = num_latents, s.top_k, s.window
    return {
        "max": jnp.full((x,), -jnp.inf, jnp.float32),
        "hist": jnp.zeros((x, s.num_bins), jnp.int32),
        "top_values": jnp.full((x, k), -jnp.inf, jnp.float32),
        "top_rows": jnp.full((x, k), -1, jnp.int32),
        "top_positions": jnp.full((x, k), -1, jnp.int32),
        "top_tokens": jnp.full((x, k, w), -1, jnp.int32),
        "top_acts": jnp.zeros((x, k, w), jnp.float32),
    }


def _step(model, sae, site, s, state, params, sae_params, tokens, mask, keep, row_offset):
    """One batch: updated state, and this batch's fire counts [X] and activation sums [X]."""
    codes = _codes(model, sae, site, params, sae_params, tokens, mask)  # [B, T, X]
    b, t, x = codes.shape
    kept = keep[..., None]
    fired = kept & (codes != 0)
    counts = fired.sum((0, 1), dtype=jnp.int32)
    sums = jnp.where(kept, codes, 0.0).sum((0, 1))
    batch_max = jnp.where(kept, codes, -jnp.inf).max((0, 1))

    # Histogram of positive activations over fixed log-spaced bins.
    flat = codes.reshape(b * t, x)
    positive = (keep.reshape(-1, 1) & (flat > 0)).astype(jnp.int32)
    step = (s.log_hi - s.log_lo) / s.num_bins
    bins = jnp.floor((jnp.log10(jnp.maximum(flat, 1e-30)) - s.log_lo) / step)
    bins = jnp.clip(bins, 0, s.num_bins - 1).astype(jnp.int32)  # [N, X]
    hist = state["hist"].at[jnp.arange(x)[None, :], bins].add(positive)

    # Top contexts: the batch's best K per feature, then merged with the kept K.
    scores = jnp.where(kept & (codes > 0), codes, -jnp.inf).reshape(b * t, x).T  # [X, N]
    k = min(s.top_k, b * t)
    values, flat_index = jax.lax.top_k(scores, k)  # [X, k]
    rows, positions = flat_index // t, flat_index % t
    offsets = jnp.arange(-s.before, s.after + 1)  # [W]
    where = positions[..., None] + offsets  # [X, k, W]
    inside = (where >= 0) & (where < t)
    clipped = jnp.clip(where, 0, t - 1)
    real = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    row_index = jnp.broadcast_to(rows[..., None], where.shape)
    shown = inside & real[row_index, clipped]
    window_tokens = jnp.where(shown, tokens[row_index, clipped], -1)
    feature = jnp.broadcast_to(jnp.arange(x)[:, None, None], where.shape)
    window_acts = jnp.where(shown & keep[row_index, clipped],
                            codes[row_index, clipped, feature], 0.0)  # fmt: skip
    unused = ~(values > -jnp.inf)
    batch_best = {
        "top_values": values,
        "top_rows": jnp.where(unused, -1, rows + row_offset),
        "top_positions": jnp.where(unused, -1, positions),
        "top_tokens": window_tokens,
        "top_acts": window_acts,
    }
    merged = {name: jnp.concatenate([state[name], batch_best[name]], 1) for name in batch_best}
    best_values, best = jax.lax.top_k(merged["top_values"], s.top_k)  # [X, K]
    new_state = {"max": jnp.maximum(state["max"], batch_max), "hist": hist}
    new_state["top_values"] = best_values
    for name in ("top_rows", "top_positions"):
        new_state[name] = jnp.take_along_axis(merged[name], best, 1)
    for name in ("top_tokens", "top_acts"):
        new_state[name] = jnp.take_along_axis(merged[name], best[..., None], 1)
    return new_state, counts, sums


_jit_step = jax.jit(_step, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))


@dataclasses.dataclass
class FeatureStats:
    """What `feature_stats` found, as host (NumPy) arrays.

    Attributes:
      num_tokens: Tokens the SAE saw (after exclusions).
      fires: [X] tokens on which each feature's code was nonzero.
      max: [X] largest activation over the tokens seen (nan with no tokens).
      sum: [X] sum of activations over the tokens seen.
      histogram: [X, M] counts of positive activations in log-spaced bins.
      bin_edges: [M + 1] the bins' edges (the first and last bins also count values outside).
      quantile_levels: [Q].
      quantiles: [X, Q] activation quantiles where the feature fires (nan where it never does;
        see the module docstring for the binning error).
      top_values: [X, K] the K largest activations, descending (-inf where fewer fired).
      top_rows, top_positions: [X, K] where they are (row in the stream, counted from 0 over
        all batches; column in that row, so under left padding it counts the padding); -1
        where unused.
      top_tokens: [X, K, W] token ids of each context window (-1 outside the row or padding).
      top_acts: [X, K, W] the feature's activation on each window token (0 where excluded).
      context_before: Tokens of each window before the top token (the top token is at this
        index of the window).
      site, head_index: Where the SAE read.
    """

    num_tokens: int
    fires: np.ndarray
    max: np.ndarray
    sum: np.ndarray
    histogram: np.ndarray
    bin_edges: np.ndarray
    quantile_levels: np.ndarray
    quantiles: np.ndarray
    top_values: np.ndarray
    top_rows: np.ndarray
    top_positions: np.ndarray
    top_tokens: np.ndarray
    top_acts: np.ndarray
    context_before: int
    site: str = ""
    head_index: int | None = None

    @property
    def num_latents(self) -> int:
        return int(self.fires.shape[0])

    @property
    def density(self) -> np.ndarray:
        """[X] fraction of tokens on which each feature fires."""
        return self.fires / max(self.num_tokens, 1)

    @property
    def mean_active(self) -> np.ndarray:
        """[X] mean activation over the tokens where the feature fires (nan if never)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fires > 0, self.sum / self.fires, np.nan)

    def save(self, path: paths.PathLike) -> None:
        """Writes the stats as one .npz file (local or gs://)."""
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        arrays["head_index"] = -1 if self.head_index is None else self.head_index
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        paths.write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: paths.PathLike) -> FeatureStats:
        """Reads what `save` wrote."""
        with np.load(io.BytesIO(paths.read_bytes(path))) as data:
            values = {name: data[name] for name in data.files}
        for name in ("num_tokens", "context_before", "head_index"):
            values[name] = int(values[name])
        values["site"] = str(values["site"])
        values["head_index"] = None if values["head_index"] < 0 else values["head_index"]
        return cls(**values)

    def contexts(self, feature: int) -> list[dict[str, Any]]:
        """A feature's top contexts, best first: {'value', 'row', 'position', 'tokens',
        'acts'} with the window's real tokens only (ids and per-token activations)."""
        (feature,) = check_features([feature], self.num_latents)
        found = []
        for j in range(self.top_values.shape[1]):
            if self.top_rows[feature, j] < 0:
                break
            shown = self.top_tokens[feature, j] >= 0
            found.append({
                "value": float(self.top_values[feature, j]),
                "row": int(self.top_rows[feature, j]),
                "position": int(self.top_positions[feature, j]),
                "tokens": self.top_tokens[feature, j][shown].tolist(),
                "acts": self.top_acts[feature, j][shown].tolist(),
                "index": int(np.cumsum(shown)[self.context_before] - 1),  # Of the top token.
            })  # fmt: skip
        return found


def _quantiles(histogram, maxima, edges, levels) -> np.ndarray:
    """[X, Q] quantiles from binned counts: the geometric centre of the bin reached."""
    centres = np.sqrt(edges[:-1] * edges[1:])
    cumulative = np.cumsum(histogram, axis=1)  # [X, M]
    total = cumulative[:, -1:]
    out = np.full((histogram.shape[0], len(levels)), np.nan)
    for q, level in enumerate(levels):
        target = np.maximum(np.ceil(level * total), 1)
        index = np.minimum((cumulative < target).sum(1), len(centres) - 1)
        out[:, q] = np.minimum(centres[index], maxima)
    out[total[:, 0] == 0] = np.nan
    return out


def feature_stats(
    model: nn.Module,
    params,
    sae: nn.Module,
    sae_params,
    batches: Iterable[Any],
    *,
    site: str | None = None,
    head_index: int | None = None,
    top_k: int = 20,
    context: int = 8,
    context_after: int = 4,
    quantile_levels: Sequence[float] = QUANTILES,
    histogram_range: tuple[float, float] = HISTOGRAM_RANGE,
    num_bins: int = NUM_BINS,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    max_batches: int | None = None,
    allow_other_site: bool = False,
) -> FeatureStats:
    """Streams token batches through the model and SAE and gathers per-feature statistics.

    Args:
      model: A `Transformer`; params: its parameters.
      sae: The SAE (an `interp.sae.modules.SAE`); sae_params: its 'params'.
      batches: Token batches: [B, T] int arrays, (tokens, attention_mask) tuples, or dicts
        with 'tokens' and optionally 'attention_mask'; any number (a stream).
      site: Hook name (ours or TransformerLens's); default the SAE config's hook_name.
      head_index: For a per-head SAE, its head (default the config's hook_head_index).
      top_k: Contexts kept per feature (K).
      context: Tokens shown before each top token; context_after: after it.
      quantile_levels: Levels of the activation quantiles (where the feature fires).
      histogram_range: (lo, hi) > 0 of the log-spaced histogram bins.
      num_bins: Histogram bins (M).
      bos_id, skip_first, exclude_ids: Positions the SAE does not see, as in
        `interp.data.activations.keep_mask` (use the SAE's training values).
      max_batches: Stop after this many batches.
      allow_other_site: Accept a `site` other than the SAE config's (see `resolve_site`).

    Returns:
      A `FeatureStats`.

    Raises:
      ValueError: see `resolve_site`; with no batches; for a bad histogram range; for
        batches longer than the model's max_len.
    """
    resolved = resolve_site(model, sae, site, head_index, allow_other_site=allow_other_site)
    lo, hi = histogram_range
    if not 0 < lo < hi:
        raise ValueError(f"histogram_range={histogram_range} must satisfy 0 < lo < hi.")
    settings = _Settings(top_k, context, context_after, num_bins,
                         float(np.log10(lo)), float(np.log10(hi)))  # fmt: skip
    num_latents = int(sae_params["W_dec"].shape[0])
    state = _init_state(num_latents, settings)
    fires = np.zeros(num_latents, np.int64)
    sums = np.zeros(num_latents, np.float64)
    num_tokens = rows = num_batches = 0
    for batch in batches:
        if max_batches is not None and num_batches >= max_batches:
            break
        tokens, mask = activations.split_batch(batch)
        model.config.check_length(tokens.shape[1], "feature_stats' batches")
        keep = activations.keep_mask(tokens, mask, bos_id=bos_id, skip_first=skip_first,
                                     exclude_ids=tuple(exclude_ids))  # fmt: skip
        state, counts, batch_sums = _jit_step(
            model, sae, resolved, settings, state, params, sae_params, jnp.asarray(tokens),
            None if mask is None else jnp.asarray(mask), jnp.asarray(keep), jnp.int32(rows),
        )  # fmt: skip
        counts, batch_sums = jax.device_get((counts, batch_sums))
        fires += counts
        sums += batch_sums
        num_tokens += int(keep.sum())
        rows += tokens.shape[0]
        num_batches += 1
    if not num_batches:
        raise ValueError("feature_stats got no batches.")
    state = jax.device_get(state)
    edges = np.logspace(settings.log_lo, settings.log_hi, num_bins + 1)
    maxima = np.where(np.isfinite(state["max"]), state["max"], np.nan)
    levels = np.asarray(quantile_levels, np.float64)
    histogram = np.asarray(state["hist"], np.int64)
    return FeatureStats(
        num_tokens=num_tokens,
        fires=fires,
        max=maxima,
        sum=sums,
        histogram=histogram,
        bin_edges=edges,
        quantile_levels=levels,
        quantiles=_quantiles(histogram, maxima, edges, levels),
        top_values=np.asarray(state["top_values"]),
        top_rows=np.asarray(state["top_rows"]),
        top_positions=np.asarray(state["top_positions"]),
        top_tokens=np.asarray(state["top_tokens"]),
        top_acts=np.asarray(state["top_acts"]),
        context_before=context,
        site=resolved.name,
        head_index=resolved.head_index,
    )


# --- Search -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The features that fire most on a text, best first.

    Attributes:
      features: [k] feature indices.
      scores: [k] what they were ranked by (max activation, or its ratio to the feature's
        dataset max with `relative_to`).
      activations: [k] their largest activation over the searched positions.
      positions: [k] the position of that activation.
      per_token: [k, T] each feature's activation at every position (0 where not searched).
      above_max: [k] bool, with `relative_to`: the text drives the feature above its
        recorded maximum (score > 1), so that maximum did not show the feature's range (the
        dataset it was taken over misses what the text holds) and the score overstates how
        near its peak the feature is. All False without `relative_to`.
    """

    features: np.ndarray
    scores: np.ndarray
    activations: np.ndarray
    positions: np.ndarray
    per_token: np.ndarray
    above_max: np.ndarray | None = None


def search_features(
    model: nn.Module,
    params,
    sae: nn.Module,
    sae_params,
    tokens,
    positions: Sequence[int] | None = None,
    k: int = 10,
    *,
    site: str | None = None,
    head_index: int | None = None,
    relative_to: FeatureStats | None = None,
    attention_mask=None,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    allow_other_site: bool = False,
) -> SearchResult:
    """The features that fire most on a text (Neuronpedia's search by text / by token).

    Each feature is scored by its largest activation over the searched positions (all kept
    positions, or `positions` only: pass one position to search by token).

    Args:
      model, params, sae, sae_params: As for `feature_stats`.
      tokens: [T] (or [1, T]) int token ids of one text.
      positions: Positions to search (default every position `keep_mask` keeps).
      k: How many features to return.
      site, head_index: As for `feature_stats`.
      relative_to: Rank by activation / the feature's max over a dataset (its
        `FeatureStats`, or the [X] maxima themselves), favouring features this text drives
        near their peak, as Neuronpedia's activation-density-aware search does; features
        that never fired in that dataset are left out. A feature the text drives above
        that max is flagged (`SearchResult.above_max`) and a warning logged.
      attention_mask: Optional [T] (or [1, T]), 1 for real tokens (a padded row).
      bos_id, skip_first, exclude_ids: Positions left out, as in `feature_stats`.
      allow_other_site: As for `feature_stats`.

    Returns:
      A `SearchResult` (features with zero score are not returned).

    Raises:
      ValueError: see `resolve_site`; for positions outside the text; for a text longer
        than the model's max_len.
    """
    resolved = resolve_site(model, sae, site, head_index, allow_other_site=allow_other_site)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"search_features takes one text, [T] or [1, T]; got {tokens.shape}.")
    length = tokens.shape[1]
    model.config.check_length(length, "The searched text")
    mask = None if attention_mask is None else np.asarray(attention_mask).reshape(1, length)
    keep = activations.keep_mask(tokens, mask, bos_id=bos_id, skip_first=skip_first,
                                 exclude_ids=tuple(exclude_ids))[0]  # fmt: skip
    if positions is not None:
        chosen = np.asarray(positions, np.int64).reshape(-1)
        if ((chosen < -length) | (chosen >= length)).any():
            raise ValueError(f"positions {chosen.tolist()} outside a text of {length} tokens.")
        only = np.zeros(length, bool)
        only[chosen] = True
        keep = keep & only
    codes = _jit_codes(model, sae, resolved, params, sae_params, jnp.asarray(tokens),
                       None if mask is None else jnp.asarray(mask))  # fmt: skip
    codes = np.asarray(codes)[0]  # [T, X]
    per_token = np.where(keep[:, None], codes, 0.0).T  # [X, T]
    best = per_token.max(1) if length else np.zeros(per_token.shape[0])
    scores = best.copy()
    if relative_to is not None:
        maxima = relative_to.max if isinstance(relative_to, FeatureStats) else relative_to
        maxima = np.asarray(maxima, np.float64)
        if maxima.shape != best.shape:
            raise ValueError(f"relative_to has {maxima.shape} maxima for {best.shape[0]} features.")
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.where(maxima > 0, best / maxima, 0.0)
    scores = np.nan_to_num(scores, nan=0.0)
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[scores[order] > 0]
    # Above 1 beyond float32 rounding (the same token through other batch shapes).
    above = scores[order] > 1 + _ABOVE_MAX_TOLERANCE if relative_to is not None else None
    if above is not None and above.any():
        logging.warning(
            "search_features: %s above their recorded maximum (x %s): those maxima were "
            "taken over rows that never showed what this text does; take them over more, or "
            "more representative, text.",
            ", ".join(f"feature {f}" for f in order[above]),
            ", ".join(f"{s:.2f}" for s in scores[order][above]),
        )
    return SearchResult(
        features=order,
        scores=scores[order],
        activations=best[order],
        positions=per_token[order].argmax(1),
        per_token=per_token[order],
        above_max=np.zeros(len(order), bool) if above is None else above,
    )
