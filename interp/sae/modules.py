"""Sparse autoencoders: ReLU + L1, TopK, BatchTopK and JumpReLU, as functional Flax modules.

Legend: B batch of activation vectors, D input width (d_in), X latents (num_latents).

Parameter names and layouts follow the SAELens convention so checkpoints interchange directly:
W_enc [D, X], b_enc [X], W_dec [X, D], b_dec [D], and threshold [X] for JumpReLU and BatchTopK
(BatchTopK trains with a batch-level top-k and infers with a threshold, as SAELens does).

    sae = SAE(SAEConfig(architecture="topk", d_in=768, num_latents=32768, k=32))
    params = sae.init(jax.random.key(0), x)["params"]
    codes = sae.apply({"params": params}, x, method="encode")    # [B, X], at most k nonzeros
    x_hat = sae.apply({"params": params}, codes, method="decode")  # [B, D]

Inputs are raw model activations: `input_scale` (fixed when training starts, e.g. to give unit
mean squared norm) is applied inside encode and undone inside decode.

`init_params` is the training initialisation; the training losses and the constraints applied
around each optimizer step are in `losses.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from interp import records
from interp.sae import architectures

ARCHITECTURES = tuple(architectures.ARCHITECTURES)  # Each defined in architectures.py.
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
_LAYER_NORM_EPS = 1e-5  # SAELens's, added to the standard deviation.


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture and loss settings of one sparse autoencoder.

    Attributes:
      architecture: 'relu' (ReLU + L1, Anthropic), 'topk' (OpenAI), 'batchtopk', 'jumprelu'
        (Gemma Scope), 'matryoshka_batchtopk' (`interp.sae.architectures` defines each).
      d_in: D, width of the activations.
      num_latents: X.
      k: Active latents per token (topk), or mean per token (batchtopk, matryoshka).
      matryoshka_widths: matryoshka_batchtopk: the nested prefix sizes of the latents, each
        trained to reconstruct on its own, increasing, the last num_latents.
      subtract_decoder_bias: Encode x - b_dec (the pre-encoder bias of OpenAI's TopK; SAELens's
        apply_b_dec_to_input). Anthropic's 2024 ReLU recipe does not.
      input_scale: Multiplies inputs before encoding (and divides reconstructions).
      l1_coefficient: Sparsity penalty (relu: L1 weighted by decoder norms; jumprelu: L0).
      l1_warmup_steps: Linear warm-up of the sparsity coefficient from 0.
      auxk_alpha: Weight of the AuxK loss on dead latents (topk, batchtopk); 0 disables it.
      auxk_k: Latents the AuxK loss uses (OpenAI: d_in / 2); None means d_in // 2.
      dead_tokens: A latent is dead (AuxK trains it) after firing on none of this many
        tokens. None: resolved from the run's length when training starts
        (`interp.sae.train.resolve_dead_tokens`: a tenth of the run's tokens, at most the
        10M of Gao et al. 2024), so that AuxK acts in runs shorter than 10M tokens too.
      jumprelu_bandwidth: Width of the straight-through kernel for the threshold gradient.
      jumprelu_init_threshold: Initial threshold (jumprelu; batchtopk's before its estimate).
      threshold_rate: BatchTopK: rate of the running average that estimates the inference
        threshold (the rate is 1 / (step + 1) while that is larger, a plain mean at first).
      unit_norm_decoder: Keep decoder rows at unit norm (renormalised after every step, the
        gradient's component along each row removed before it). None: the architecture's
        recipe, on for topk, batchtopk and jumprelu, off for relu (Anthropic 2024).
      sparse_kernels: TopK and BatchTopK decode by gathering the active decoder rows and
        differentiate with scatter-adds over the active latents only (custom VJPs); False
        builds dense [B, X] codes and matmuls (the plain formulation, kept as the reference).
      dtype: Compute dtype of the matmuls ('float32' or 'bfloat16'); params stay float32.
      normalize_activations: Per-token normalisation of inputs, undone on the output, as
        SAELens's inference options: 'none'; 'layer_norm' (x - mean, divided by std + 1e-5;
        std with Bessel's correction, as torch's); 'constant_norm_rescale' (x scaled to norm
        sqrt(d_in)). With either, `decode` needs the input (`decode(codes, x)`).
      d_out: Output width of a transcoder (W_dec [X, d_out], b_dec [d_out]); None: d_in (an
        SAE). A transcoder never subtracts b_dec from its input.
      skip_connection: A skip transcoder's W_skip [d_out, d_in]: output + x W_skip^T.
      hook_name: The site (interp's name) the SAE reads, when known; evaluation, splicing
        and steering use it by default.
      hook_head_index: For a per-head SAE at a head-shaped site, the head it reads (SAELens's
        hook_head_index); rows are then that head's [..., head_dim].
      output_hook_name: A transcoder's output site (SAELens's hook_name_out); None for an SAE,
        which reconstructs its own site.
    """

    architecture: str = "topk"
    d_in: int = 64
    num_latents: int = 512
    k: int = 32
    matryoshka_widths: tuple[int, ...] = ()
    subtract_decoder_bias: bool = True
    input_scale: float = 1.0
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    auxk_alpha: float = 1 / 32
    auxk_k: int | None = None
    dead_tokens: int | None = None
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    threshold_rate: float = 0.01
    unit_norm_decoder: bool | None = None
    sparse_kernels: bool = True
    dtype: str = "float32"
    normalize_activations: str = "none"
    d_out: int | None = None
    skip_connection: bool = False
    hook_name: str | None = None
    hook_head_index: int | None = None
    output_hook_name: str | None = None

    def __post_init__(self):
        # A list from JSON or a ConfigDict: a tuple, so the config stays hashable.
        object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        arch = architectures.architecture(self.architecture)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r}; expected one of "
                f"{NORMALIZATIONS}."
            )
        if self.is_transcoder and self.subtract_decoder_bias:
            raise ValueError(
                "A transcoder (d_out, skip_connection or output_hook_name set) reads its input "
                "as is: set subtract_decoder_bias=False."
            )
        if self.hook_head_index is not None and self.hook_head_index < 0:
            raise ValueError(f"hook_head_index={self.hook_head_index} must be >= 0.")
        arch.validate(self)
        if self.matryoshka_widths and self.architecture != "matryoshka_batchtopk":
            raise ValueError(
                f"matryoshka_widths applies to architecture='matryoshka_batchtopk', not "
                f"{self.architecture!r}."
            )
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise ValueError(
                f"dead_tokens={self.dead_tokens} must be >= 1 (tokens without firing after "
                "which a latent counts as dead), or None to scale it with the run."
            )

    @property
    def output_width(self) -> int:
        """Width of the reconstruction: d_out for a transcoder, else d_in."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        """Whether the output is another site than the input (d_out or a skip connection)."""
        return self.d_out is not None or self.skip_connection or bool(self.output_hook_name)

    @property
    def arch(self) -> architectures.Architecture:
        """The architecture's definition (`interp.sae.architectures`)."""
        return architectures.architecture(self.architecture)

    @property
    def normalizes_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm (`unit_norm_decoder`, resolved)."""
        if self.unit_norm_decoder is None:
            return self.arch.unit_norm_decoder
        return self.unit_norm_decoder

    def replace(self, **changes) -> SAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values) -> SAEConfig:
        """Builds a config from a dict or ConfigDict, rejecting unknown fields by name."""
        return records.from_dict(cls, values)


class SAE(nn.Module):
    """A sparse autoencoder over activation vectors. x: [..., D]."""

    config: SAEConfig

    def setup(self):
        cfg = self.config
        d, x, o = cfg.d_in, cfg.num_latents, cfg.output_width
        partition = nn.with_logical_partitioning
        normal = nn.initializers.normal(stddev=d**-0.5)
        zeros = nn.initializers.zeros
        # Plain initialisers give shapes and logical axes; `init_params` is the training init.
        self.W_enc = self.param("W_enc", partition(normal, ("embed", "latent")), (d, x))
        self.b_enc = self.param("b_enc", partition(zeros, ("latent",)), (x,))
        self.W_dec = self.param("W_dec", partition(normal, ("latent", "embed")), (x, o))
        self.b_dec = self.param("b_dec", partition(zeros, ("embed",)), (o,))
        if cfg.skip_connection:
            self.W_skip = self.param("W_skip", partition(zeros, (None, "embed")), (o, d))
        if cfg.arch.has_threshold:
            init = nn.initializers.constant(cfg.jumprelu_init_threshold)
            self.threshold = self.param("threshold", partition(init, ("latent",)), (x,))

    def pre_activation(self, x):
        """Encoder pre-activations [..., X] (before the sparsifying non-linearity)."""
        cfg = self.config
        if x.shape[-1] != cfg.d_in:
            raise ValueError(
                f"This SAE reads {cfg.d_in}-wide activations but got shape {x.shape}; is it "
                "applied at the hook site it was trained on?"
            )
        dtype = jnp.dtype(cfg.dtype)
        x = self._normalize(x)[0]
        if cfg.subtract_decoder_bias:
            x = x - self.b_dec
        pre = jnp.einsum(
            "...D,DX->...X",
            x.astype(dtype),
            self.W_enc.astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return pre + self.b_enc

    def activate(self, pre):
        """The architecture's sparsifying non-linearity, in inference mode."""
        cfg = self.config
        return cfg.arch.activate(cfg, pre, self.threshold if cfg.arch.has_threshold else None)

    def _normalize(self, x):
        """(x scaled and per-token normalised [..., D] float32, fn undoing it on an output)."""
        cfg = self.config
        x = x.astype(jnp.float32) * cfg.input_scale
        if cfg.normalize_activations == "layer_norm":
            mean = x.mean(-1, keepdims=True)
            x = x - mean
            std = jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) / max(x.shape[-1] - 1, 1))
            x = x / (std + _LAYER_NORM_EPS)
            return x, lambda y: (y * std + mean) / cfg.input_scale
        if cfg.normalize_activations == "constant_norm_rescale":
            coefficient = cfg.d_in**0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True)
            return x * coefficient, lambda y: y / coefficient / cfg.input_scale
        return x, lambda y: y / cfg.input_scale

    def encode(self, x):
        """Latent codes [..., X] of raw activations x [..., D]."""
        return self.activate(self.pre_activation(x))

    def decode(self, codes, x=None):
        """Reconstruction [..., D] (a transcoder's output [..., d_out]) in the raw scale.

        Args:
          codes: [..., X].
          x: The input [..., D] the codes came from; needed (and only used) when the SAE
            normalises each token or has a skip connection.

        Raises:
          ValueError: when such an SAE is given no `x`.
        """
        cfg = self.config
        per_token = cfg.normalize_activations != "none" and not cfg.is_transcoder
        if (per_token or cfg.skip_connection) and x is None:
            why = "has a skip connection" if cfg.skip_connection else "normalises each token"
            raise ValueError(
                f"This SAE {why}, so decoding needs its input: call decode(codes, x), or "
                "the SAE itself."
            )
        dtype = jnp.dtype(cfg.dtype)
        x_hat = jnp.einsum(
            "...X,XD->...D",
            codes.astype(dtype),
            self.W_dec.astype(dtype),
            preferred_element_type=jnp.float32,
        )
        x_hat = x_hat + self.b_dec
        if cfg.is_transcoder:  # Its output is another site: never renormalised (SAELens).
            out = x_hat / cfg.input_scale
            if cfg.skip_connection:
                out = out + jnp.einsum("...D,OD->...O", x.astype(jnp.float32), self.W_skip)
            return out
        if not per_token:
            return x_hat / cfg.input_scale
        return self._normalize(x)[1](x_hat)

    def __call__(self, x):
        """(reconstruction [..., D] or a transcoder's output [..., d_out], codes [..., X])."""
        codes = self.encode(x)
        return self.decode(codes, x), codes


def init_params(config: SAEConfig, key: jax.Array, b_dec=None) -> dict[str, jax.Array]:
    """Training initialisation: unit-norm decoder rows, encoder tied to the decoder (OpenAI).

    Args:
      config: The SAE's config.
      key: PRNG key.
      b_dec: Optional [D] initial decoder bias, e.g. the geometric median or mean of the
        (unscaled) training activations; it is scaled by input_scale here.

    Returns:
      The 'params' tree of `SAE(config)`.
    """
    w_dec = jax.random.normal(key, (config.num_latents, config.output_width), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    if config.output_width == config.d_in:
        w_enc = w_dec.T
    else:  # A transcoder: no decoder to tie to; unit-norm encoder columns.
        enc_key = jax.random.fold_in(key, 1)
        w_enc = jax.random.normal(enc_key, (config.d_in, config.num_latents), jnp.float32)
        w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
    params = {
        "W_enc": w_enc,
        "b_enc": jnp.zeros((config.num_latents,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros((config.output_width,), jnp.float32)
        if b_dec is None
        else jnp.asarray(b_dec, jnp.float32) * config.input_scale,
    }
    if config.skip_connection:
        params["W_skip"] = jnp.zeros((config.output_width, config.d_in), jnp.float32)
    if config.arch.has_threshold:
        params["threshold"] = jnp.full(
            (config.num_latents,), config.jumprelu_init_threshold, jnp.float32
        )
    return params
