"""Dictionary architectures, each defined once: its sparsifying activation at inference, its
training forward (dense, or through the sparse kernels), its extra parameters, the
constraints around each optimizer step, and its SAELens names.

Legend: B batch of activation vectors, D input width (d_in), O output width (d_out; D for an
SAE), X latents (num_latents).

`SAE` (modules.py) infers with `activate`; the losses (losses.py) train with `train_forward`
and the constraints; io.py exports and loads with the SAELens names; the SAE job names runs
with `sparsity_label`. Adding an architecture is one `Architecture` subclass here, registered
in `ARCHITECTURES`, plus its tests.

    arch = architecture("topk")
    codes = arch.activate(config, pre, threshold=None)           # [..., X]
    out = arch.train_forward(config, params, x, pre, shift)      # reconstruction, L0, ...

The architectures (references in each class):
- relu: ReLU + L1 weighted by decoder norms (Anthropic, April 2024 update).
- topk: the k largest pre-activations of each row (Gao et al. 2024).
- batchtopk: the k * B largest of the batch, a threshold at inference (Bussmann et al. 2024).
- jumprelu: ReLU gated by a trained threshold, L0 penalty (Rajamanoharan et al. 2024).
- matryoshka_batchtopk: BatchTopK whose nested prefixes of latents each reconstruct on their
  own (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from interp.sae.kernels import (
    batch_top_k,
    batch_topk_codes,
    gather_pre_activation,
    jumprelu,
    sparse_decode,
    step_function,
    top_k_latents,
    topk_codes,
)

MIN_THRESHOLD = 1e-6  # JumpReLU thresholds are clipped here after each step to stay positive.


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """What an architecture's training forward gives the loss (scaled units, see losses.py).

    Attributes:
      x_hat: [B, O] reconstruction, b_dec included.
      l0: Mean active latents per row, a scalar.
      fired: [X] bool, latents active on some row of the batch.
      smallest: The smallest positive activation kept (+inf if none).
      sparsity: The unweighted sparsity penalty (L1 or L0); 0 for architectures without one.
      extra_losses: {name: scalar} more loss terms, added with weight 1 and logged
        (Matryoshka's inner reconstructions).
    """

    x_hat: jax.Array
    l0: jax.Array
    fired: jax.Array
    smallest: jax.Array
    sparsity: jax.Array
    extra_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def dense_decode(config, codes, w_dec):
    """codes [B, X] @ W_dec [X, O] in the compute dtype, accumulated in float32."""
    dtype = jnp.dtype(config.dtype)
    return jnp.einsum(
        "BX,XD->BD", codes.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32
    )


def _dense_output(config, params, codes, sparsity) -> TrainOutput:
    """TrainOutput of dense codes [B, X]."""
    x_hat = dense_decode(config, codes, params["W_dec"]) + params["b_dec"]
    active = codes > 0
    return TrainOutput(
        x_hat=x_hat,
        l0=jnp.sum(active) / codes.shape[0],
        fired=jnp.any(active, axis=0),
        smallest=jnp.min(jnp.where(active, codes, jnp.inf)),
        sparsity=sparsity,
    )


def _sparse_values(config, params, x, pre, shift, rows, cols):
    """The kept activations [B, k] or [n] at (rows, cols), differentiable in the encoder."""
    constant_pre = jax.lax.stop_gradient(pre)
    return jax.nn.relu(
        gather_pre_activation(constant_pre, x, shift, params["W_enc"], params["b_enc"], rows, cols)
    )


def _sparse_output(config, params, values, rows, cols, batch) -> TrainOutput:
    """TrainOutput of sparse activations: values at cols (per row [B, k], or flat with rows)."""
    dtype = jnp.dtype(config.dtype)
    x_hat = sparse_decode(batch, dtype, values, rows, cols, params["W_dec"]) + params["b_dec"]
    active = values > 0
    num_latents = params["W_enc"].shape[-1]
    return TrainOutput(
        x_hat=x_hat,
        l0=jnp.sum(active) / batch,
        fired=jnp.zeros(num_latents, bool).at[cols.reshape(-1)].max(active.reshape(-1)),
        smallest=jnp.min(jnp.where(active, values, jnp.inf)),
        sparsity=jnp.zeros((), jnp.float32),
    )


def _batch_top_k_coordinates(pre, k):
    """(rows, cols) [k * B] of the batch's k * B largest ReLU'd pre-activations, row-sorted."""
    _, flat = batch_top_k(jax.nn.relu(jax.lax.stop_gradient(pre)), k * pre.shape[0])
    flat = jnp.sort(flat)  # Row-sorted coordinates for segment sums.
    return flat // pre.shape[-1], flat % pre.shape[-1]


class Architecture:
    """One dictionary architecture. Subclasses set the class attributes and override
    `activate` and `train_forward` (and the constraints where they add any)."""

    name: ClassVar[str]
    # How SAELens stores the inference model: 'standard' (ReLU), 'topk' or 'jumprelu'.
    sae_lens: ClassVar[str]
    # metadata.training_architecture on export, when SAELens records one (BatchTopK-trained
    # folders are JumpReLU folders that say how they were trained).
    training_architecture: ClassVar[str | None] = None
    # 'k': k sets the sparsity; 'l1' or 'l0': a penalty weighted by l1_coefficient.
    sparsity: ClassVar[str] = "k"
    has_threshold: ClassVar[bool] = False  # A threshold [X] parameter.
    unit_norm_decoder: ClassVar[bool] = True  # The default of config.unit_norm_decoder.
    auxk: ClassVar[bool] = False  # An AuxK term on dead latents (Gao et al. 2024).

    def validate(self, config) -> None:
        """Raises ValueError for settings this architecture cannot train or use."""
        if self.sparsity == "k" and not 0 < config.k <= config.num_latents:
            raise ValueError(f"k={config.k} must be in 1..num_latents={config.num_latents}.")

    def activate(self, config, pre, threshold):
        """Inference codes [..., X] of pre-activations [..., X] (threshold [X] or None)."""
        raise NotImplementedError

    def train_forward(self, config, params, x, pre, shift) -> TrainOutput:
        """The training forward of scaled inputs x [B, D] with pre-activations pre [B, X]
        (`shift` [D]: what the encoder subtracted from x)."""
        raise NotImplementedError

    def constrain_grads(self, config, grads, params):
        """Gradients as the optimizer should see them (a dict; decoder projection is shared)."""
        return grads

    def constrain_params(self, config, params, out_aux, step):
        """Parameters after the optimizer's update (a dict; decoder norms are shared)."""
        return params

    def training_details(self, config) -> dict[str, Any]:
        """metadata.training_architecture_details on export (SAELens's), e.g. {'k': 32}."""
        return {"k": config.k} if self.sparsity == "k" else {}

    def sparsity_label(self, entry: dict[str, Any]) -> str:
        """The sparsity part of a run's SAE name: 'k16' or 'l0.3'."""
        if self.sparsity == "k":
            return f"k{entry['k']}"
        return f"l{entry.get('l1_coefficient', 5.0):g}"


class ReLU(Architecture):
    """ReLU + L1 of codes weighted by decoder row norms (Anthropic, April 2024 update);
    decoder norms free."""

    name = "relu"
    sae_lens = "standard"
    sparsity = "l1"
    unit_norm_decoder = False

    def activate(self, config, pre, threshold):
        return jax.nn.relu(pre)

    def train_forward(self, config, params, x, pre, shift):
        codes = jax.nn.relu(pre)
        row_norms = jnp.linalg.norm(params["W_dec"], axis=-1)
        sparsity = jnp.mean(jnp.sum(codes * row_norms, axis=-1))
        return _dense_output(config, params, codes, sparsity)


class TopK(Architecture):
    """The k largest pre-activations of each row, ReLU'd (Gao et al. 2024), + AuxK."""

    name = "topk"
    sae_lens = "topk"
    auxk = True

    def activate(self, config, pre, threshold):
        return topk_codes(pre.reshape(-1, pre.shape[-1]), config.k).reshape(pre.shape)

    def train_forward(self, config, params, x, pre, shift):
        if not config.sparse_kernels:
            return _dense_output(config, params, topk_codes(pre, config.k), jnp.zeros(()))
        _, cols = top_k_latents(jax.lax.stop_gradient(pre), config.k)
        values = _sparse_values(config, params, x, pre, shift, None, cols)
        return _sparse_output(config, params, values, None, cols, x.shape[0])


class JumpReLU(Architecture):
    """ReLU gated by a per-latent threshold, trained through straight-through estimators of
    width `jumprelu_bandwidth`, with an L0 penalty (Rajamanoharan et al. 2024, Gemma Scope)."""

    name = "jumprelu"
    sae_lens = "jumprelu"
    sparsity = "l0"
    has_threshold = True

    def activate(self, config, pre, threshold):
        return jnp.where(pre > threshold, jax.nn.relu(pre), 0.0)

    def train_forward(self, config, params, x, pre, shift):
        threshold = params["threshold"]
        codes = jumprelu(pre, threshold, config.jumprelu_bandwidth)
        l0_smooth = step_function(pre, threshold, config.jumprelu_bandwidth)
        return _dense_output(config, params, codes, jnp.mean(jnp.sum(l0_smooth, axis=-1)))

    def constrain_params(self, config, params, out_aux, step):
        params = dict(params)
        params["threshold"] = jnp.maximum(params["threshold"], MIN_THRESHOLD)
        return params


class BatchTopK(Architecture):
    """The k * B largest activations of the batch (Bussmann et al. 2024), + AuxK; infers with
    one threshold, the running average of the smallest activation kept (stored broadcast to
    [X], so inference is the JumpReLU rule, as SAELens exports it)."""

    name = "batchtopk"
    sae_lens = "jumprelu"
    training_architecture = "batchtopk"
    has_threshold = True
    auxk = True

    def activate(self, config, pre, threshold):
        return JumpReLU.activate(self, config, pre, threshold)

    def _coordinates(self, config, params, x, pre, shift):
        """(values, rows, cols) of the kept activations, flat and row-sorted."""
        rows, cols = _batch_top_k_coordinates(pre, config.k)
        return _sparse_values(config, params, x, pre, shift, rows, cols), rows, cols

    def train_forward(self, config, params, x, pre, shift):
        if not config.sparse_kernels:
            return _dense_output(config, params, batch_topk_codes(pre, config.k), jnp.zeros(()))
        values, rows, cols = self._coordinates(config, params, x, pre, shift)
        return _sparse_output(config, params, values, rows, cols, x.shape[0])

    def constrain_grads(self, config, grads, params):
        grads = dict(grads)
        grads["threshold"] = jnp.zeros_like(grads["threshold"])  # Estimated, not trained.
        return grads

    def constrain_params(self, config, params, out_aux, step):
        """The threshold moved toward this batch's smallest kept activation with rate
        max(threshold_rate, 1 / (step + 1)): the plain mean of the first 1 / threshold_rate
        batches, an exponential average after; batches with none kept are skipped."""
        params = dict(params)
        rate = jnp.maximum(config.threshold_rate, 1.0 / (jnp.asarray(step, jnp.float32) + 1.0))
        observed = out_aux["batch_threshold"]
        old = params["threshold"]
        new = (1.0 - rate) * old + rate * observed
        params["threshold"] = jnp.where(jnp.isfinite(observed), new, old)
        return params


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose nested prefixes of latents (`matryoshka_widths`, the full width last)
    each reconstruct the input on their own: the loss adds, for each inner prefix, the MSE of
    the reconstruction from its latents alone (Bussmann et al. 2025; SAELens's
    MatryoshkaBatchTopKTrainingSAE, exported like BatchTopK as a JumpReLU folder). Early
    latents learn general features, later ones refine them, without absorbing them."""

    name = "matryoshka_batchtopk"
    training_architecture = "matryoshka_batchtopk"

    def validate(self, config) -> None:
        super().validate(config)
        widths = tuple(config.matryoshka_widths)
        if not widths:
            raise ValueError(
                "A matryoshka_batchtopk SAE needs matryoshka_widths, the nested prefix sizes "
                f"of its latents, e.g. ({config.num_latents // 4}, {config.num_latents})."
            )
        if any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or widths[0] < 1:
            raise ValueError(f"matryoshka_widths={widths} must be positive and increasing.")
        if widths[-1] != config.num_latents:
            raise ValueError(
                f"matryoshka_widths={widths} must end at num_latents={config.num_latents} "
                "(the outermost level is the whole SAE)."
            )

    def training_details(self, config) -> dict[str, Any]:
        return {"k": config.k, "matryoshka_widths": list(config.matryoshka_widths)}

    def train_forward(self, config, params, x, pre, shift):
        widths = tuple(config.matryoshka_widths)[:-1]  # The outermost is the whole SAE.
        if not config.sparse_kernels:
            codes = batch_topk_codes(pre, config.k)
            out = _dense_output(config, params, codes, jnp.zeros(()))
            column = jnp.arange(codes.shape[-1])
            inner = [
                dense_decode(config, jnp.where(column < w, codes, 0.0), params["W_dec"])
                for w in widths
            ]
        else:
            values, rows, cols = self._coordinates(config, params, x, pre, shift)
            out = _sparse_output(config, params, values, rows, cols, x.shape[0])
            dtype = jnp.dtype(config.dtype)
            inner = [
                sparse_decode(
                    x.shape[0], dtype, jnp.where(cols < w, values, 0.0), rows, cols, params["W_dec"]
                )  # fmt: skip
                for w in widths
            ]
        extra = {
            f"inner_mse_{w}": jnp.mean(jnp.sum(jnp.square(y + params["b_dec"] - x), axis=-1))
            for w, y in zip(widths, inner, strict=True)
        }
        return dataclasses.replace(out, extra_losses=extra)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (ReLU(), TopK(), BatchTopK(), JumpReLU(), MatryoshkaBatchTopK())
}


def architecture(name: str) -> Architecture:
    """The registered architecture called `name`.

    Raises:
      ValueError: naming the known architectures.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"Unknown SAE architecture {name!r}; expected one of {tuple(ARCHITECTURES)}."
        ) from None
