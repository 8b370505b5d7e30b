"""Steering with SAE features: clamp, add, scale or ablate latents at the SAE's hook site.

Legend: B batch, T positions, D the site's row width (the SAE's d_in), X latents, E edits.

    maxima = steering.max_activations(model, params, sae, sae_params, batches, bos_id=bos)
    steer = steering.feature_intervention(
        sae, sae_params, [steering.Clamp.to_max(123, 10.0, maxima), steering.Ablate(7)])
    logits, _ = hooks.run_with_hooks(model, params, tokens,
                                     interventions={sae.config.hook_name: steer})
    tokens = generate(model, params, prompt, 20, interventions={sae.config.hook_name: steer})

At each token the SAE reads the site's row x (`interp.models.sites.to_rows`, so head-shaped
sites and per-head SAEs work as in harvesting and evaluation), f = encode(x), the edits give
f', and the row becomes

    x - decode(f) + decode(f')      (keep_error=True: the SAE's error x - decode(f) is kept)
    decode(f')                      (keep_error=False: the reconstruction itself)

computed as x + (decode(f') - decode(f)), so with no edit (or edits that change nothing) the
site, and the model's output, are exactly unchanged. Every edit is f'_i = m f_i + a on one
latent i: Clamp (m=0, a=value), Add (m=1, a=scale: the decoder direction W_dec[i] times
scale, in the SAE's input scale), Scale (m=factor, a=0), Ablate (m=0, a=0); edits apply in
order. Positions are all edited alike (BOS included): restrict with a position-aware wrapper
if needed.

The intervention is a pytree (`FeatureIntervention`): the SAE module, site and head are
static; the SAE's parameters, feature indices and coefficients are array leaves. Passed as
an argument to a jitted function, or to `generate` (which splits interventions into static
structure and traced leaves), a sweep over clamp values or features compiles once:

    def logits(params, tokens, steer):
        return hooks.run_with_hooks(model, params, tokens, interventions={site: steer})[0]
    run = parallel.sharded_jit(logits, mesh, params_sharding=parallel.param_shardings(
        model, mesh))                                  # Or jax.jit(logits), unsharded.
    for value in values:                               # One compilation.
        run(params, tokens, steering.feature_intervention(sae, sae_params, [Clamp(7, value)]))

(Closed over instead, as in `hooks.sharded_run_with_hooks(..., interventions=...)`, each
intervention is a constant of its own program.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from interp.data import activations
from interp.models import hooks, sites

# ------------------------------------------------------------------------------- edits


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


# The edits' coefficients are stored as float32 (`feature_intervention`).
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_number(value, what: str) -> None:
    """Refuses a concrete coefficient that is not a finite (float32) real number.

    An infinite coefficient (Clamp to inf, Add -inf, Scale by inf) turns the site's rows, and
    so every later activation and logit, into inf/NaN: a completion of nothing, not a
    stronger push. Tracers (a sweep inside jit) cannot be checked here.
    """
    if not _is_concrete(value):
        return
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":  # bool, str, None (object), complex...
        raise TypeError(f"{what} must be a real number, got {value!r}.")
    numbers = array.astype(np.float64)
    if not np.all(np.isfinite(numbers)):
        kind = "NaN" if np.any(np.isnan(numbers)) else "infinite"
        raise ValueError(f"{what} is {kind} ({value!r}); steering needs a finite number.")
    if np.any(np.abs(numbers) > _FLOAT32_MAX):
        raise ValueError(
            f"{what} is {value!r}, beyond float32's range (it would be stored as inf); "
            "steering needs a finite number."
        )


@dataclasses.dataclass(frozen=True)
class Clamp:
    """Sets latent `feature` to `value` at every position (m=0, a=value)."""

    feature: Any
    value: Any

    def __post_init__(self):
        _check_number(self.value, f"Clamp value for feature {self.feature}")

    @classmethod
    def to_max(cls, feature: int, multiple: float, maxima) -> Clamp:
        """Clamps to `multiple` times the feature's observed maximum (`max_activations`)."""
        maxima = np.asarray(maxima)
        _check_feature(feature, maxima.shape[-1])
        _check_number(multiple, f"Clamp multiple for feature {feature}")
        _check_number(maxima[feature], f"The maximum activation of feature {feature}")
        return cls(feature, multiple * float(maxima[feature]))

    def coefficients(self):
        return 0.0, self.value


@dataclasses.dataclass(frozen=True)
class Add:
    """Adds `scale` times the feature's decoder direction (its code + scale; negative
    subtracts)."""

    feature: Any
    scale: Any

    def __post_init__(self):
        _check_number(self.scale, f"Add scale for feature {self.feature}")

    def coefficients(self):
        return 1.0, self.scale


@dataclasses.dataclass(frozen=True)
class Scale:
    """Multiplies the feature's code by `factor`."""

    feature: Any
    factor: Any

    def __post_init__(self):
        _check_number(self.factor, f"Scale factor for feature {self.feature}")

    def coefficients(self):
        return self.factor, 0.0


@dataclasses.dataclass(frozen=True)
class Ablate:
    """Sets the feature's code to zero."""

    feature: Any

    def coefficients(self):
        return 0.0, 0.0


Edit = Clamp | Add | Scale | Ablate


def _check_feature(feature, num_latents: int) -> None:
    if not _is_concrete(feature):
        return
    values = np.asarray(feature)
    if values.dtype.kind not in "iu":
        raise TypeError(f"Feature index {feature!r} must be an integer.")
    if np.any((values < 0) | (values >= num_latents)):
        raise ValueError(
            f"Feature index {feature} is outside 0..{num_latents - 1}, this SAE's latents."
        )


# ------------------------------------------------------------------------ intervention


@flax.struct.dataclass
class FeatureIntervention:
    """An intervention for `interventions={hook: fn}`; build it with `feature_intervention`.

    A pytree: `sae_params`, `features` int32 [E], `multiply` and `add` float32 [E] are
    leaves (traced under jit), the rest is static.
    """

    sae_params: Any
    features: jax.Array
    multiply: jax.Array
    add: jax.Array
    sae: nn.Module = flax.struct.field(pytree_node=False)
    hook: str | None = flax.struct.field(pytree_node=False, default=None)
    head_index: int | None = flax.struct.field(pytree_node=False, default=None)
    keep_error: bool = flax.struct.field(pytree_node=False, default=True)
    allow_other_site: bool = flax.struct.field(pytree_node=False, default=False)

    def edit_rows(self, x):
        """The edited rows [..., D] (float32) of rows x [..., D]."""
        x = x.astype(jnp.float32)
        codes = self.sae.apply({"params": self.sae_params}, x, method="encode")  # [..., X]
        edited = codes
        for i in range(self.features.shape[0]):  # E is static; edits apply in order.
            feature = self.features[i]
            current = jnp.take(edited, feature, axis=-1)
            new = self.multiply[i] * current + self.add[i]
            edited = edited.at[..., feature].set(new.astype(edited.dtype))
        decode = self.sae.apply({"params": self.sae_params}, edited, x, method="decode")
        if not self.keep_error:
            return decode
        # x - decode(f) + decode(f'), arranged so that f' == f gives x exactly.
        return x + (decode - self.sae.apply({"params": self.sae_params}, codes, x, method="decode"))

    def __call__(self, value):
        """The site's new value (its own shape and dtype) for its value."""
        layout = self.hook or ""
        rows = sites.to_rows(layout, value, self.head_index)  # [B, T, D]
        d_in = self.sae.config.d_in
        if rows.shape[-1] != d_in:
            hint = ""
            if self.head_index is None and value.ndim == 4:
                hint = " (a per-head SAE needs head_index / SAELens's hook_head_index)"
            raise ValueError(
                f"This SAE reads {d_in}-wide rows, but the site it steers (SAE site "
                f"{self.hook!r}) gives rows of width {rows.shape[-1]} (head_index="
                f"{self.head_index}){hint}; is it the site the SAE was trained on?"
            )
        return sites.from_rows(layout, value, self.edit_rows(rows), self.head_index)

    def check_site(self, model: nn.Module, name: str) -> None:
        """Refuses a placement at a site other than the SAE's, unless built with
        `allow_other_site` (called by `hooks`; `activations.check_sae_site`)."""
        activations.check_sae_site(
            self.sae, name, model=model, allow_other_site=self.allow_other_site
        )


def feature_intervention(
    sae: nn.Module,
    sae_params: Any,
    edits: Sequence[Edit],
    *,
    keep_error: bool = True,
    hook: str | None = None,
    head_index: int | None = None,
    allow_other_site: bool = False,
) -> FeatureIntervention:
    """An intervention that edits SAE features at the SAE's site.

    Args:
      sae: The SAE module (`interp.sae.load(path)[0]`); used only through `apply(...,
        method='encode'/'decode')` and its config.
      sae_params: Its parameters.
      edits: `Clamp`, `Add`, `Scale`, `Ablate`, applied in order. Indices and coefficients
        may be Python numbers, arrays, or tracers (inside a jitted function).
      keep_error: Keep the SAE's reconstruction error (x - decode(f) + decode(f')); False
        writes the reconstruction decode(f') itself.
      hook: The site the SAE reads (ours or TransformerLens's name); default the SAE
        config's `hook_name`. Only its layout (attention patterns or not) matters here.
      head_index: For a per-head SAE, its head; default the config's `hook_head_index`.
      allow_other_site: Accept a `hook`, or a placement (`interventions={name: ...}`), at
        a site other than the SAE config's; refused by default
        (`interp.data.activations.check_sae_site`).

    Returns:
      A `FeatureIntervention`, for `interventions={hook: fn}` of `hooks.run_with_hooks` and
      `generate`, eager or jitted.

    Raises:
      ValueError: for a transcoder, a `hook` other than the SAE's own site (see
        `allow_other_site`; a placement elsewhere is refused when the model runs), a
        feature index outside the SAE's latents, or a
        coefficient that is not finite (NaN, +-inf, or past float32's range; checked when
        the edit is made, where concrete); a site whose rows are not d_in wide is refused
        when the model runs.
      TypeError: for an edit that is not one of the four, a feature index that is not an
        integer, or a coefficient that is not a real number (a string, a bool).
    """
    config = sae.config
    if config.is_transcoder:
        raise ValueError(
            "Steering edits one site's features in place; this is a transcoder (its output "
            "is another site), which steering does not support."
        )
    activations.check_sae_site(sae, hook, allow_other_site=allow_other_site)
    hook = hook or config.hook_name
    if hook and sites.is_transformer_lens_name(hook) and not sites.depends_on_model(hook):
        hook = sites.from_transformer_lens(hook)
    head_index = config.hook_head_index if head_index is None else head_index
    multiply, add, features = [], [], []
    for edit in edits:
        if not isinstance(edit, Clamp | Add | Scale | Ablate):
            raise TypeError(f"Edits are Clamp, Add, Scale or Ablate; got {edit!r}.")
        _check_feature(edit.feature, config.num_latents)
        m, a = edit.coefficients()
        features.append(edit.feature)
        multiply.append(m)
        add.append(a)

    def stack(values, dtype):
        if not values:
            return jnp.zeros((0,), dtype)
        return jnp.stack([jnp.asarray(v, dtype).reshape(()) for v in values])

    return FeatureIntervention(
        sae_params=sae_params,
        features=stack(features, jnp.int32),
        multiply=stack(multiply, jnp.float32),
        add=stack(add, jnp.float32),
        sae=sae,
        hook=hook,
        head_index=head_index,
        keep_error=keep_error,
        allow_other_site=allow_other_site,
    )


# ------------------------------------------------------------------------------ maxima


def max_activations(
    model: nn.Module,
    params: Any,
    sae: nn.Module,
    sae_params: Any,
    batches: Iterable[Any],
    *,
    hook: str | None = None,
    head_index: int | None = None,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    max_batches: int | None = None,
    allow_other_site: bool = False,
) -> np.ndarray:
    """Each feature's largest activation over the tokens of `batches` (the "max" of "10x max").

    Args:
      model, params: The model and its parameters.
      sae, sae_params: The SAE and its parameters.
      batches: [B, T] token arrays, (tokens, attention_mask) tuples or dicts with 'tokens'
        (and optionally 'attention_mask').
      hook: The SAE's site; default its config's `hook_name`.
      head_index: For a per-head SAE; default the config's `hook_head_index`.
      bos_id, skip_first, exclude_ids: Positions left out, as in harvesting and SAE
        evaluation (`interp.data.activations.keep_mask`); padding is always left out.
      max_batches: Stop after this many batches.
      allow_other_site: Accept a `hook` other than the SAE config's.

    Returns:
      float32 [X]: the maximum of each latent's code over the kept positions (a latent that
      never fires has its largest code, 0 for the ReLU-like architectures).

    Raises:
      ValueError: with no site, one other than the SAE's own or of another width
        (`activations.resolve_sae_site`), batches longer than the model's max_len, or no
        kept positions.
    """
    site = activations.resolve_sae_site(  # Widths checked too.
        model, sae, hook, head_index, allow_other_site=allow_other_site
    )
    name, head_index = site.input, site.head_index
    exclusions = dict(bos_id=bos_id, skip_first=skip_first, exclude_ids=tuple(exclude_ids))
    best = None
    for count, batch in enumerate(batches):
        if max_batches is not None and count >= max_batches:
            break
        tokens, mask = activations.split_batch(batch)
        model.config.check_length(tokens.shape[1], "max_activations' batches")
        keep = activations.keep_mask(tokens, mask, **exclusions)
        batch_max = _jit_batch_max(model, sae, name, head_index, params, sae_params,
                                   tokens, mask, keep)  # fmt: skip
        best = batch_max if best is None else jnp.maximum(best, batch_max)
    if best is None or not np.all(np.isfinite(np.asarray(best))):
        raise ValueError("max_activations saw no kept positions (all padding or excluded).")
    return np.asarray(best, np.float32)


def _batch_max(model, sae, name, head_index, params, sae_params, tokens, mask, keep):
    """[X]: each latent's max code over the kept rows of one batch (-inf if none)."""
    _, values = hooks.run_with_hooks(model, params, tokens, capture=[name], attention_mask=mask)
    rows = sites.to_rows(name, values[name], head_index).astype(jnp.float32)  # [B, T, D]
    codes = sae.apply({"params": sae_params}, rows, method="encode")  # [B, T, X]
    return jnp.max(jnp.where(keep[..., None], codes, -math.inf), axis=(0, 1))


_jit_batch_max = jax.jit(_batch_max, static_argnums=(0, 1, 2, 3))


# ---------------------------------------------------------------------- positions, sweeps


@flax.struct.dataclass
class FromPosition:
    """`intervention` applied only at positions >= `start` of each row: steering the tokens
    a model generates, not its prompt (`generate` passes positions; see `from_position`).

    A pytree: `intervention` (its own leaves) and `start` int32 [B] are traced.
    """

    intervention: Any
    start: jax.Array

    def __call__(self, value, positions):
        edited = self.intervention(value)
        keep = positions >= self.start[:, None]  # [B, S]
        keep = keep.reshape(keep.shape + (1,) * (value.ndim - 2))
        return jnp.where(keep, edited, value)

    def check_site(self, model: nn.Module, name: str) -> None:
        check = getattr(self.intervention, "check_site", None)
        if callable(check):
            check(model, name)


def from_position(intervention, start) -> FromPosition:
    """`intervention` at positions >= `start` only (int, or int [B] per row; positions count
    real tokens, as `interp.models.generate.token_positions`). Position-aware, so for
    `generate`, which passes positions; start 0 edits every real token (not padding).

        steer = from_position(feature_intervention(sae, sae_params, [Add(7, 4.0)]),
                              start=prompt_lengths)      # The generated tokens only.
        generate(model, params, prompt, 20, attention_mask=mask, interventions={hook: steer})
    """
    return FromPosition(intervention, jnp.asarray(start, jnp.int32).reshape(-1))


@flax.struct.dataclass
class AddVector:
    """Adds `vector` [D] to every row of a site: a steering vector (e.g. `diff_mean`), the
    baseline SAE steering is measured against. A pytree: `vector` is traced, so a sweep of
    its scale compiles once."""

    vector: jax.Array

    def __call__(self, value):
        rows = value.reshape(*value.shape[:2], -1)  # [B, S, D]: a row per position.
        return (rows + self.vector.astype(rows.dtype)).reshape(value.shape)


def diff_mean(concept_rows, baseline_rows) -> np.ndarray:
    """The unit difference-in-means direction [D]: mean(concept_rows) - mean(baseline_rows),
    normalised (AxBench's DiffMean, Wu et al. 2025; Marks & Tegmark 2023).

    Args:
      concept_rows: [N, D] a site's rows where the concept is.
      baseline_rows: [M, D] its rows on ordinary text.

    Raises:
      ValueError: for no rows, or means that coincide.
    """
    concept_rows, baseline_rows = np.asarray(concept_rows), np.asarray(baseline_rows)
    if not len(concept_rows) or not len(baseline_rows):
        raise ValueError("diff_mean needs rows of the concept and of ordinary text.")
    direction = concept_rows.astype(np.float64).mean(0) - baseline_rows.astype(np.float64).mean(0)
    norm = np.linalg.norm(direction)
    if not norm > 0:
        raise ValueError("The concept's mean row equals the baseline's: no direction.")
    return (direction / norm).astype(np.float32)


METHODS = ("clamp", "add", "diffmean")  # Sweep methods; diffmean is the non-SAE baseline.
POSITIONS = ("all", "generated")


def sweep_edit(method: str, feature: int, value: float) -> Edit:
    """The SAE edit a sweep setting makes: 'clamp' sets the feature's code to `value`; 'add'
    adds `value` to it (the decoder direction times `value`, whatever the code was)."""
    if method == "clamp":
        return Clamp(feature, value)
    if method == "add":
        return Add(feature, value)
    raise ValueError(f"SAE steering edits are 'clamp' or 'add', got {method!r}.")


def completion_loss(model, params, tokens, mask, starts) -> np.ndarray:
    """Each row's mean next-token loss (nats/token) over its tokens from `starts` on.

    The fluency measure of steering benchmarks (AxBench, Wu et al. 2025, judge it with an
    LLM; here, the unsteered model's own loss on the steered text, lower is more fluent).

    Args:
      model, params: The unsteered model.
      tokens: int [B, T], prompts then completions, right-padded.
      mask: [B, T], 1 for real tokens.
      starts: int [B], each row's first completion position (its prompt length).

    Returns:
      float64 [B]; NaN for a row with no completion token.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    logits = model.apply({"params": params}, tokens, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]  # [B, T-1]
    columns = jnp.arange(1, tokens.shape[1])[None, :]
    scored = (columns >= jnp.asarray(starts)[:, None]) & (mask[:, 1:] > 0)
    total = np.asarray((nll * scored).sum(-1), np.float64)
    count = np.asarray(scored.sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
