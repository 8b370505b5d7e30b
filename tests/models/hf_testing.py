"""Tiny random-weight Hugging Face models and logit comparisons, shared by the hf_params,
hf_config and pretrained tests.

Each variant is a tiny HF model (fp32, eager attention) saved with `save_pretrained` once per
process and loaded with our `from_pretrained`; logits agree when max |ours - hf| / max |hf| <=
TOLERANCE over real (unpadded) positions.
"""

import functools
import pathlib
import tempfile

import jax
import numpy as np
import torch
import transformers

from interp import models

VOCAB, BATCH, LENGTH, PAD = 128, 2, 16, 5
TOLERANCE = 1e-4
VARIANTS = ["gpt2", "neox_parallel", "neox_sequential", "llama_gqa_llama3"]
VARIANTS += ["llama_mha_bias_tied", "gemma2", "gemma3", "qwen2", "qwen3", "mistral"]
VARIANTS += ["llama_dynamic"]
# "<variant>_mqa": the variant with one kv head. With qwen2 and mistral (MQA already), every
# family that has kv heads.
MQA_VARIANTS = ["llama_gqa_llama3", "gemma2", "gemma3", "qwen3"]


def hf_config(variant):
    """The transformers config of a variant."""
    if variant.endswith("_mqa"):
        config = hf_config(variant.removesuffix("_mqa"))
        config.num_key_value_heads = 1
        return config
    small = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    small.update(max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    small.update(attn_implementation="eager")
    if variant == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
        )
    if variant.startswith("neox"):
        return transformers.GPTNeoXConfig(
            **small,
            num_hidden_layers=2,
            rotary_pct=0.25,
            use_parallel_residual=variant == "neox_parallel",
        )
    if variant == "llama_gqa_llama3":
        # theta and original length chosen so that the 8 rotary frequencies fall in all three
        # llama3 bands: kept (wavelength < 16), smoothed (16..64) and divided by factor (> 64).
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        scaling.update(original_max_position_embeddings=64)
        return transformers.LlamaConfig(
            **dict(small, max_position_embeddings=128),
            num_hidden_layers=2,
            num_key_value_heads=2,
            rope_theta=500_000.0,
            rope_scaling=scaling,
        )
    if variant == "llama_mha_bias_tied":
        return transformers.LlamaConfig(
            **small,
            num_hidden_layers=2,
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        )
    if variant == "llama_dynamic":
        # max_position_embeddings < LENGTH: the NTK base grows with the input's length.
        return transformers.LlamaConfig(
            **dict(small, max_position_embeddings=8),
            num_hidden_layers=2,
            num_key_value_heads=2,
            rope_scaling=dict(rope_type="dynamic", factor=3.0),
        )
    if variant == "gemma3":
        # Six layers: Gemma 3's default 5:1 pattern (layers 0-4 slide, 5 is global). Linear
        # scaling on the global rotary only; a local base far from the global one.
        full = dict(rope_type="linear", factor=4.0, rope_theta=1_000_000.0)
        return transformers.Gemma3TextConfig(
            **small,
            num_hidden_layers=6,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            rope_parameters=dict(
                full_attention=full,
                sliding_attention=dict(rope_type="default", rope_theta=100.0),
            ),
        )
    if variant == "qwen2":
        # One kv head (MQA); the window switched on for layers 1 and 2.
        return transformers.Qwen2Config(
            **small,
            num_hidden_layers=3,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        )
    if variant == "qwen3":
        # head_dim 24 != 64 / 4; YaRN whose ramp (dims 2..7 of 12) lies inside the head.
        yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
        yarn.update(beta_fast=4.0, beta_slow=1.0, rope_theta=100.0)
        return transformers.Qwen3Config(
            **small,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=24,
            rope_parameters=yarn,
        )
    if variant == "mistral":
        return transformers.MistralConfig(
            **small,
            num_hidden_layers=2,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=4,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        )
    if variant == "gemma3_multimodal":
        # Gemma3ForConditionalGeneration: the gemma3 text model beside a tiny vision tower.
        vision = transformers.SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return transformers.Gemma3Config(
            # Without final softcapping, which the multimodal model does not apply.
            text_config=dict(hf_config("gemma3").to_dict(), final_logit_softcapping=None),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
        )
    assert variant == "gemma2"
    return transformers.Gemma2Config(
        **small,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,  # < LENGTH: sliding and global layers differ.
        query_pre_attn_scalar=24,  # != head_dim: catches a wrong attention scale.
        attn_logit_softcapping=4.0,  # Small caps so that tanh is far from linear.
        final_logit_softcapping=3.0,
    )


def _randomize(model, seed=0):
    """Weights of std 0.1 (norm gains 1 + 0.1 noise) so attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type in ("gemma2", "gemma3_text", "gemma3")
    offset = 0.0 if gemma else 1.0  # Gemma norms are (1 + w).
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn(param.shape, generator=generator)
            # 1-D weights are norm gains (linear and embedding weights are 2-D).
            gain = param.ndim == 1 and name.endswith("weight")
            param.copy_(noise + offset if gain else noise)
    return model


def hf_model(variant, dtype=torch.float32):
    """A random-weight transformers model of a variant, in eval mode."""
    torch.manual_seed(0)
    config = hf_config(variant)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return _randomize(model).to(dtype).eval()


_CHECKPOINTS = tempfile.TemporaryDirectory(prefix="hf_testing_")  # removed at exit


@functools.cache
def converted(variant):
    """(variant, HF model, its folder, our model, our params), built once per process."""
    hf = hf_model(variant)
    folder = pathlib.Path(_CHECKPOINTS.name) / variant
    hf.save_pretrained(folder, safe_serialization=True)
    model, params, _ = models.from_pretrained(folder)
    return variant, hf, folder, model, params


@functools.cache
def _jitted(model):
    return jax.jit(model.apply)


def ours(model, params, tokens, mask=None):
    """Our logits [B, T, V] as NumPy."""
    mask = np.ones(tokens.shape, np.int32) if mask is None else mask  # one compile per model
    return np.asarray(_jitted(model)({"params": params}, tokens, attention_mask=mask))


def hf_logits(hf, tokens, mask=None, positions=None):
    """The transformers model's logits [B, T, V] as float32 NumPy."""
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens),
            attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions),
        )
    return out.logits.float().numpy()


def relative_error(ours, reference, real=None):
    """max |ours - reference| / max |reference|, over the rows where `real` is nonzero."""
    if real is not None:
        ours, reference = ours[real.astype(bool)], reference[real.astype(bool)]
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def random_tokens(seed=0):
    """int32 [BATCH, LENGTH] token ids."""
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)


def assert_trees_identical(a, b):
    """Same structure, dtypes, shapes and bytes."""
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
