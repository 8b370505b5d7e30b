"""`ModelConfig`: the choices that make one decoder into GPT-2, GPT-NeoX, Llama, Gemma 2/3,
Qwen 2/2.5/3 or Mistral.

A frozen dataclass rather than an `ml_collections.ConfigDict`: Flax module attributes must be
hashable, and a typed record documents every field. Experiment configs hold a plain dict under
`config.model` and turn it into a `ModelConfig` with `ModelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from interp import records

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("learned", "rotary")
ROPE_SCALINGS = (None, "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
      family: Which Hugging Face family the config came from (a model_type of
        `hf_config.SUPPORTED`, or 'custom'); informational, behaviour is set by the fields below.
      vocab_size: V.
      d_model: D, the residual stream width.
      num_layers: Number of blocks.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads (K < N is grouped-query attention, K = 1 multi-query).
      head_dim: H.
      mlp_dim: F, the MLP hidden width.
      max_len: Largest position (learned position embeddings are this long).
      norm: 'layernorm' (with bias) or 'rmsnorm'.
      norm_eps: Epsilon inside the norm.
      norm_offset: RMSNorm scales by (offset + weight); Gemma stores weight - 1, so 1.0.
      activation: MLP non-linearity: 'gelu' (exact erf), 'gelu_tanh', 'silu', 'relu'.
      gated_mlp: down(act(gate(x)) * up(x)) as in Llama/Gemma, else down(act(up(x))).
      attn_bias: Biases on the q/k/v projections.
      attn_out_bias: Bias on the attention output projection.
      mlp_bias: Biases on the MLP projections.
      positions: 'learned' absolute embeddings or 'rotary'.
      rotary_fraction: Fraction of each head's dims that rotate (GPT-NeoX: 0.25).
      rope_theta: Rotary base.
      rope_local_theta: Rotary base of the sliding-window layers, which then rotate without
        `rope_scaling` (Gemma 3: 10k locally, 1M with scaling globally); None: all layers
        share one rotary.
      rope_scaling: How transformers' `rope_type` rescales the rotary frequencies (see
        `transformer.rotary_inverse_frequencies`): None; 'linear' (positions / factor);
        'dynamic' (NTK: for inputs longer than max_len the base grows with the input's
        length; past max_len, cached generation therefore follows transformers' generate,
        not a forward pass over the whole sequence); 'yarn' (per-frequency blend of
        interpolation and extrapolation, and an attention factor on the rotated dims);
        'llama3' (Llama 3.1+ frequency bands).
      rope_factor: Scaling factor of every rope_scaling type.
      rope_low_freq_factor, rope_high_freq_factor: Llama 3 band edges.
      rope_original_max_len: Pretraining length of the yarn and llama3 scalings.
      rope_beta_fast, rope_beta_slow: YaRN's ramp bounds, in rotations over the original
        length.
      rope_attention_factor: YaRN's multiplier on cos/sin; None: 0.1 * ln(factor) + 1.
      rope_truncate: YaRN rounds its ramp bounds to whole dims (transformers' `truncate`).
      parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, GPT-J) instead of sequential.
      post_norms: Gemma 2's extra norms on the attention and MLP outputs.
      qk_norm: A norm (the model's `norm`, over H, one scale shared by the heads) on each
        query and key head before rotary (Qwen 3, Gemma 3).
      tied_embeddings: The unembedding is the transposed token embedding.
      embed_scale: Multiply token embeddings by sqrt(D) (Gemma).
      query_scale: Attention logits are scaled by this; None means head_dim ** -0.5.
      attn_softcap: Gemma 2 soft-capping of attention logits, cap * tanh(logits / cap).
      final_softcap: Same for the output logits.
      sliding_window: Window W of sliding-window attention layers (a query sees the W most
        recent positions, itself included), or None.
      sliding_layers: Indices of layers that use the sliding window.
      dtype: Compute dtype name ('float32', 'bfloat16').
      param_dtype: Storage dtype of parameters.
    """

    family: str = "custom"
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 256
    max_len: int = 512
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    activation: str = "gelu_tanh"
    gated_mlp: bool = False
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    positions: str = "learned"
    rotary_fraction: float = 1.0
    rope_theta: float = 10_000.0
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_local_theta: float | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    parallel_residual: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = True
    embed_scale: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        checks = (
            (self.norm in NORMS, f"norm={self.norm!r}; expected one of {NORMS}"),
            (
                self.activation in ACTIVATIONS,
                f"activation={self.activation!r}; expected one of {ACTIVATIONS}",
            ),
            (
                self.positions in POSITIONS,
                f"positions={self.positions!r}; expected {POSITIONS}",
            ),
            (
                self.rope_scaling in ROPE_SCALINGS,
                f"rope_scaling={self.rope_scaling!r}; expected one of {ROPE_SCALINGS}",
            ),
            (
                self.num_heads % self.num_kv_heads == 0,
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
            ),
            (0.0 < self.rotary_fraction <= 1.0, "rotary_fraction must be in (0, 1]"),
            (
                self.rotary_dim % 2 == 0,
                f"rotary dims {self.rotary_dim} (head_dim * rotary_fraction) must be even",
            ),
            (
                all(0 <= i < self.num_layers for i in self.sliding_layers),
                f"sliding_layers {self.sliding_layers} outside 0..{self.num_layers - 1}",
            ),
            (
                not self.sliding_layers or self.sliding_window,
                "sliding_layers given without a sliding_window",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid ModelConfig: {message}.")
        # Lists from JSON/ml_collections become tuples so the config stays hashable.
        object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))

    def check_length(
        self, length: int, what: str, *, allow_longer: bool = False, option: str | None = None
    ) -> None:
        """Refuses running the model on `length` tokens when that is past `max_len`.

        The one rule for every entry point that runs the model on lengths a user chooses
        (generation, steering, feature search and statistics, SAE evaluation; influence's
        `gradients.check_batch`): a model has seen no position past `max_len`. Learned
        position embeddings end there; rotary ones compute any position, but what the model
        does there was never trained, so it is refused unless asked for (`allow_longer`,
        e.g. for a model whose rope scaling is meant to stretch it).

        Args:
          length: Tokens per sequence (a prompt plus the tokens to generate).
          what: What is that long, for the message ("prompt of 70 tokens + max_new_tokens
            20").
          allow_longer: Accept lengths past `max_len` for rotary positions.
          option: The argument that sets `allow_longer` where the caller has one, named in
            the message.

        Raises:
          ValueError: naming both lengths.
        """
        if length <= self.max_len:
            return
        if self.positions == "learned":
            fix = "its learned position embeddings stop there; shorten the input."
        elif allow_longer:
            return
        else:
            fix = "shorten the input" + (
                f", or pass {option}=True to run past it (rotary positions extrapolate, e.g. "
                "with rope scaling, but the model never saw such lengths)."
                if option
                else "."
            )
        raise ValueError(
            f"{what}: {length} tokens, more than the {self.max_len} positions this model "
            f"was trained for (max_len); {fix}"
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def yarn_attention_factor(self) -> float:
        """YaRN's factor on cos and sin: rope_attention_factor, else 0.1 ln(factor) + 1."""
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        return 1.0 if self.rope_factor <= 1 else 0.1 * math.log(self.rope_factor) + 1.0

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sliding_layers"] = list(self.sliding_layers)
        return out

    @classmethod
    def from_dict(cls, values) -> ModelConfig:
        """Builds a config from a dict or ConfigDict, rejecting unknown fields by name."""
        return records.from_dict(cls, values)
