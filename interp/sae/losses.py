"""SAE training objectives: the per-architecture losses and the constraints around each step.

Legend: B batch of activation vectors, D input width (d_in), X latents (num_latents).

Training (interp/sae/train.py drives it), with x raw activations [B, D]:

    loss, metrics, aux = sae_forward(config, params, x, step=step, dead_mask=dead)
    grads = constrain_grads(config, grads, params)        # decoder-parallel component removed
    params = constrain_params(config, params, aux, step)  # unit rows, thresholds

`sae_loss` is `sae_forward` without the aux outputs. TopK and BatchTopK train through sparse
kernels (`sparse_decode`, `gather_pre_activation`: custom VJPs that touch only the active
latents) and take their top-k shard-locally under a mesh (`top_k_latents`, `batch_top_k`).

The module, its config and `init_params` are in `modules.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from interp.sae import architectures
from interp.sae.kernels import gather_pre_activation, sparse_decode, top_k_latents
from interp.sae.modules import SAEConfig


def sparsity_coefficient(config: SAEConfig, step) -> jax.Array:
    """l1_coefficient, warmed up linearly from 0 over l1_warmup_steps (step: steps done)."""
    if config.l1_warmup_steps <= 0:
        return jnp.asarray(config.l1_coefficient, jnp.float32)
    ramp = jnp.minimum(jnp.asarray(step, jnp.float32) / config.l1_warmup_steps, 1.0)
    return config.l1_coefficient * ramp


def _pre_activation(config: SAEConfig, params, x_scaled):
    """Encoder pre-activations [B, X] of already scaled inputs, and the encoder's shift [D].

    In the compute dtype (accumulated in float32 inside the matmul): [B, X] is the largest
    array of a step, and every pass over it (bias, top-k, masks) reads it again, so bf16
    halves that traffic, as torch's autocast does for sparsify.
    """
    dtype = jnp.dtype(config.dtype)
    shift = params["b_dec"] if config.subtract_decoder_bias else jnp.zeros_like(params["b_dec"])
    pre = jnp.einsum(
        "BD,DX->BX",
        (x_scaled - shift).astype(dtype),
        params["W_enc"].astype(dtype),
        preferred_element_type=jnp.float32,
    ).astype(dtype)
    pre = pre + params["b_enc"].astype(dtype)
    return nn.with_logical_constraint(pre, ("batch", "latent")), shift


_dense_decode = architectures.dense_decode


def _mean_sum_sq(err):
    """Mean over the batch of the squared error summed over D."""
    return jnp.mean(jnp.sum(jnp.square(err), axis=-1))


def _auxk_loss(config: SAEConfig, params, x, shift, pre, residual, dead_mask):
    """AuxK (Gao et al. 2024, sec. A.2): the dead latents' top-k_aux reconstruct the residual.

    Normalised by the residual's variance about its batch mean, as OpenAI's code does
    (`normalized_mse`), and zero when no latent is dead. Its work (a top-k over all latents
    and a k_aux-sparse decode, k_aux = D/2 > k) is done whenever a dead_mask is given: the
    train step skips it by branching outside the gradient while no latent is dead
    (`uses_auxk`), which costs less than a `lax.cond` here (whose gradient would carry
    zero-filled, full-size gradients through every step).
    """
    value = _auxk_value(config, params, x, shift, pre, residual, dead_mask)
    return jnp.where(jnp.any(dead_mask), value, 0.0)


def uses_auxk(config: SAEConfig) -> bool:
    """Whether the loss has an AuxK term (topk, batchtopk and matryoshka with auxk_alpha > 0)."""
    return config.arch.auxk and config.auxk_alpha > 0


def _auxk_value(config: SAEConfig, params, x, shift, pre, residual, dead_mask):
    num_latents = pre.shape[-1]
    k_aux = min(config.auxk_k or config.d_in // 2, num_latents)
    masked = jnp.where(dead_mask, pre, -jnp.inf)
    _, cols = top_k_latents(jax.lax.stop_gradient(masked), k_aux)
    alive_pick = dead_mask[cols]  # False where fewer than k_aux latents are dead.
    if config.sparse_kernels:
        values = gather_pre_activation(
            jax.lax.stop_gradient(pre), x, shift, params["W_enc"], params["b_enc"], None, cols
        )
        values = jnp.where(alive_pick, jax.nn.relu(values), 0.0)
        e_hat = sparse_decode(x.shape[0], jnp.dtype(config.dtype), values, None, cols,
                              params["W_dec"])  # fmt: skip
    else:
        rows = jnp.arange(pre.shape[0])[:, None]
        values = jnp.where(alive_pick, jax.nn.relu(jnp.take_along_axis(pre, cols, -1)), 0.0)
        codes = jnp.zeros_like(pre).at[rows, cols].set(values)
        e_hat = _dense_decode(config, codes, params["W_dec"])
    residual = jax.lax.stop_gradient(residual)
    variance = jnp.sum(jnp.square(residual - residual.mean(0)))
    return jnp.sum(jnp.square(e_hat - residual)) / jnp.maximum(variance, 1e-12)


def sae_forward(config: SAEConfig, params, x, *, step, dead_mask=None):
    """The training forward pass: loss, scalar metrics and what the train step needs.

    All of it is in the scaled units the SAE trains in (x * input_scale). Modes are training
    modes: BatchTopK keeps the top k * B of the batch (not its threshold). The architecture's
    own part (codes, reconstruction, penalty, extra terms) is its `train_forward`
    (`interp.sae.architectures`); the MSE, the weighted penalty and AuxK are added here.

    Args:
      config: The SAE's config.
      params: Its 'params' tree.
      x: [B, D] raw activations.
      step: Optimizer steps done so far (for the sparsity warm-up); may be traced.
      dead_mask: Optional [X] bool, latents counted dead (for AuxK); None: none are.

    Returns:
      (loss, metrics, aux): metrics as in `sae_loss`, plus each extra term of the
      architecture (Matryoshka's 'inner_mse_<width>'); aux has 'fired' [X] bool (latents
      active on some token of the batch) and, for architectures with an estimated threshold
      (batchtopk, matryoshka_batchtopk), 'batch_threshold' (the smallest positive activation
      kept, +inf if none).
    """
    arch = config.arch
    x = x.astype(jnp.float32) * config.input_scale
    pre, shift = _pre_activation(config, params, x)
    coefficient = sparsity_coefficient(config, step)
    out = arch.train_forward(config, params, x, pre, shift)
    aux = {}
    if isinstance(arch, architectures.BatchTopK):
        aux["batch_threshold"] = jax.lax.stop_gradient(out.smallest)
    aux["fired"] = out.fired

    x_hat = out.x_hat
    mse = _mean_sum_sq(x_hat - x)
    fvu = jnp.sum(jnp.square(x_hat - x)) / jnp.maximum(jnp.sum(jnp.square(x - x.mean(0))), 1e-12)
    loss = mse
    penalized = arch.sparsity != "k"
    if penalized:
        loss = loss + coefficient * out.sparsity
    for value in out.extra_losses.values():
        loss = loss + value
    auxk = jnp.zeros((), jnp.float32)
    if uses_auxk(config) and dead_mask is not None:
        auxk = _auxk_loss(config, params, x, shift, pre, x - x_hat, dead_mask)
        loss = loss + config.auxk_alpha * auxk
    metrics = {
        "loss": loss,
        "mse": mse,
        "fvu": fvu,
        "l0": out.l0,
        "sparsity_loss": out.sparsity,
        "sparsity_coefficient": coefficient if penalized else jnp.zeros(()),
        "auxk_loss": auxk,
        **out.extra_losses,
    }
    return loss, metrics, aux


def sae_loss(config: SAEConfig, params, x, *, step, dead_mask=None):
    """The training loss of one SAE on a batch of raw activations.

    - relu (Anthropic, April 2024 update): MSE + lambda * sum_i f_i ||W_dec_i||_2, lambda
      warmed up linearly over l1_warmup_steps; decoder norms free.
    - topk (Gao et al. 2024): MSE of the TopK reconstruction + auxk_alpha * AuxK.
    - batchtopk (Bussmann et al. 2024): the top k * B activations of the batch, + AuxK.
    - jumprelu (Rajamanoharan et al. 2024, Gemma Scope): MSE + lambda * L0, the threshold
      trained through straight-through estimators of bandwidth `jumprelu_bandwidth`.

    MSE is the mean over the batch of the squared error summed over D, in scaled units
    (x * input_scale); FVU = sum of squared errors / sum of squared deviations from the batch
    mean (scale-free).

    Args:
      config: The SAE's config.
      params: Its 'params' tree.
      x: [B, D] raw activations.
      step: Optimizer steps done (sparsity warm-up).
      dead_mask: Optional [X] bool of dead latents (AuxK); None means none are dead.

    Returns:
      (loss, metrics) with float32 scalar metrics 'loss', 'mse', 'fvu', 'l0' (mean active
      latents per token), 'sparsity_loss' (the unweighted L1 or L0 term), 'sparsity_coefficient',
      'auxk_loss'.
    """
    loss, metrics, _ = sae_forward(config, params, x, step=step, dead_mask=dead_mask)
    return loss, metrics


# ----------------------------------------------------------------------------- constraints


def project_decoder_grad(grad_w_dec, w_dec):
    """Removes from each row of dL/dW_dec its component along that decoder row [X, D].

    With unit-norm rows this keeps the step tangent to the sphere, so Adam's update is not
    spent on a norm the renormalisation would undo (Bricken et al. 2023; Gao et al. 2024).
    """
    norms_sq = jnp.maximum(jnp.sum(jnp.square(w_dec), axis=-1, keepdims=True), 1e-12)
    parallel = jnp.sum(grad_w_dec * w_dec, axis=-1, keepdims=True) / norms_sq
    return grad_w_dec - parallel * w_dec


def normalize_decoder(w_dec):
    """Decoder rows [X, D] rescaled to unit L2 norm."""
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)


MIN_THRESHOLD = architectures.MIN_THRESHOLD


def constrain_grads(config: SAEConfig, grads, params):
    """What the train step applies to the gradients before the optimizer: the decoder-parallel
    component removed (if `normalizes_decoder`), then the architecture's own (BatchTopK's
    threshold is estimated, not trained)."""
    grads = dict(grads)
    if config.normalizes_decoder:
        grads["W_dec"] = project_decoder_grad(grads["W_dec"], params["W_dec"])
    return config.arch.constrain_grads(config, grads, params)


def constrain_params(config: SAEConfig, params, aux, step):
    """What the train step applies to the parameters after the optimizer.

    Unit-norm decoder rows (if `normalizes_decoder`), then the architecture's own: JumpReLU
    thresholds clipped to MIN_THRESHOLD; BatchTopK's threshold moved toward this batch's
    smallest kept activation (one value for all latents, as SAELens does, stored broadcast to
    [X] so that inference is the JumpReLU rule; see `architectures.BatchTopK`).

    Args:
      config: The SAE's config.
      params: Parameters after the optimizer's update.
      aux: From `sae_forward`.
      step: Steps done before this one.

    Returns:
      The constrained parameters.
    """
    params = dict(params)
    if config.normalizes_decoder:
        params["W_dec"] = normalize_decoder(params["W_dec"])
    return config.arch.constrain_params(config, params, aux, step)
