"""GGUF files written the way llama.cpp's converter writes them, from tiny random transformers
models, for the GGUF loading tests.

`write(variant, qtype, folder)` makes a transformers model of a variant, quantizes its matrices
to `qtype` with the `gguf` package, writes a GGUF file with llama.cpp's metadata keys, tensor
names (`gguf.TensorNameMap`, llama.cpp's own table, not ours), Llama's Q/K row permutation and
Gemma's 1 + w norms, and then sets the transformers model's weights to what the file holds
(the dequantized matrices), so that the model and the file compute the same function.

The K-quant types have no quantizer in the `gguf` package: their blocks are random bytes with
valid (small, finite) float16 scales, the model's matrices then being their dequantization.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import gguf
import numpy as np
import torch
import transformers

from interp.models import tokenizer as tokenizer_lib
from tests.models import gguf_tokenizer_testing, hf_testing

VOCAB = 512  # A byte-level BPE of 256 bytes, 1 special token and 255 merges.
# Matrices have rows of 256 or 512 values (d_model 256, MLP 512): every K-quant (blocks of 256
# values) applies to every one of them.
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
QTYPES += ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# K-quant blocks (ggml-common.h's block_qN_K layouts): (byte offset of the float16 d, of the
# float16 dmin or None, the sub-block scale bytes set (offset, values) or None, d's size, dmin / d).
# The fixed sub-block scales and mins (8 and 8) with dmin = d * (levels - 1) / 2 centre the
# weights on 0; Q3_K and Q6_K have signed levels and scales already. d gives weights of about
# 0.1, so that logits vary across positions (degenerate weights would hide a wrong row order).
_K_BLOCKS = {
    "Q2_K": (80, 82, (0, [0x88] * 16), 0.011, 1.5),
    "Q3_K": (108, None, None, 0.0024, None),
    "Q4_K": (0, 2, (4, [8] * 8 + [0x88] * 4), 0.0027, 7.5),
    "Q5_K": (0, 2, (4, [8] * 8 + [0x88] * 4), 0.00136, 15.5),
    "Q6_K": (208, None, None, 7e-5, None),
}
# Variants that transformers' own GGUF loader reads faithfully (it takes config values it has
# no GGUF key for from the config class's defaults: Qwen 3's head width, Gemma's soft caps and
# query scale, Gemma 3's rope scaling).
VARIANTS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
# Variants with settings transformers' GGUF loader does not read (checked against the
# transformers model the file was written from only).
OTHER_VARIANTS = ["qwen3_narrow", "gemma2_caps", "gemma3_linear"]
_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}


def hf_config(variant: str):
    """A tiny transformers config whose matrices have rows of 256 or 512 values."""
    small = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, bos_token_id=1)
    small.update(max_position_embeddings=64, eos_token_id=2, attn_implementation="eager")
    if variant in ("llama", "llama_tied"):
        return transformers.LlamaConfig(
            **small,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000.0,
            tie_word_embeddings=variant == "llama_tied",
        )
    if variant == "mistral":  # llama.cpp writes Mistral as `llama` (no sliding window key).
        return transformers.MistralConfig(
            **small,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=None,
        )
    if variant == "qwen2":
        return transformers.Qwen2Config(
            **small,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    if variant.startswith("qwen3"):  # qwen3_narrow: 64 != 256 / 2, the file's key_length.
        return transformers.Qwen3Config(
            **small,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64 if variant == "qwen3_narrow" else 128,
            tie_word_embeddings=False,
        )
    if variant.startswith("gemma2"):
        caps = dict(attn_logit_softcapping=4.0, final_logit_softcapping=3.0)
        return transformers.Gemma2Config(
            **small,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,  # llama.cpp: 1/sqrt(head_dim) but for 27B.
            sliding_window=4,
            **(caps if variant == "gemma2_caps" else {}),
        )
    assert variant.startswith("gemma3"), variant
    rope = dict(rope_type="default", rope_theta=1_000_000.0)
    if variant == "gemma3_linear":
        rope = dict(rope_type="linear", factor=4.0, rope_theta=1_000_000.0)
    return transformers.Gemma3TextConfig(
        **small,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4,
        rope_parameters=dict(
            full_attention=rope, sliding_attention=dict(rope_type="default", rope_theta=10_000.0)
        ),
    )


def hf_model(variant: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant))
    return hf_testing._randomize(model).float().eval()


def _quantize(w: np.ndarray, qtype: str, rng: np.random.Generator):
    """(what the file stores, the float32 matrix it holds) for a matrix in type `qtype`."""
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in _K_BLOCKS:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
        blocks = raw.reshape(rows, cols // block, size)
        d_at, dmin_at, scales, scale, centre = _K_BLOCKS[qtype]
        d = rng.uniform(0.5 * scale, 1.5 * scale, size=blocks.shape[:2])
        blocks[:, :, d_at : d_at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
        if dmin_at is not None:
            dmin = (d * centre).astype(np.float16)[..., None].view(np.uint8)
            blocks[:, :, dmin_at : dmin_at + 2] = dmin
        if scales is not None:
            at, values = scales
            blocks[:, :, at : at + len(values)] = np.asarray(values, np.uint8)
        stored = blocks.reshape(rows, -1)
    else:
        stored = gguf.quants.quantize(w.astype(np.float32), kind)
    return stored, np.asarray(gguf.quants.dequantize(stored, kind), np.float32)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved as pairs."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _metadata(writer: gguf.GGUFWriter, config, arch: str, name: str) -> None:
    c = config
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = c.rope_parameters
    if arch == "gemma3":
        rope = rope["full_attention"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "llama":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch.startswith("gemma"):
        writer.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)


@functools.cache
def tokenizer_folder() -> pathlib.Path:
    """A byte-level BPE of VOCAB tokens trained on a few sentences, saved as a Hugging Face
    tokenizer folder (once per process)."""
    texts = [_TEXT] * 4
    tok = tokenizer_lib.train_bpe(texts, vocab_size=VOCAB, min_frequency=1)
    assert tok.vocab_size == VOCAB, tok.vocab_size
    folder = pathlib.Path(_FOLDERS.name) / "tokenizer"
    tok.save(str(folder))
    return folder


_FOLDERS = tempfile.TemporaryDirectory(prefix="gguf_testing_")  # removed at exit
_TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world. It is a way I have of driving off the "
    "spleen and regulating the circulation. Whenever I find myself growing grim about the "
    "mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself "
    "involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral "
    "I meet; then, I account it high time to get to sea as soon as I can. Emma Woodhouse, "
    "handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
    "unite some of the best blessings of existence; 1234567890 (12.5%) \u00e9\u00e8 na\u00efve."
)


def write(variant: str, qtype: str, folder: pathlib.Path, *, seed: int = 0):
    """Writes `<folder>/<variant>-<qtype>.gguf`; returns (its path, the transformers model
    holding the file's weights)."""
    model = hf_model(variant)
    config = model.config
    arch = _ARCH[config.model_type]
    rng = np.random.default_rng(seed)
    path = pathlib.Path(folder) / f"{variant}-{qtype}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, config, arch, f"tiny-{variant}")
    gguf_tokenizer_testing.write_tokenizer(writer, tokenizer_folder(), pre="gpt-2")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = model.state_dict()
    held = {}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        w = tensor.numpy().astype(np.float32)
        if arch.startswith("gemma") and base.endswith("norm"):
            w = w + 1.0  # llama.cpp stores Gemma's RMSNorm gain as 1 + w.
        if w.ndim == 2:
            stored, w_file = _quantize(w, qtype, rng)
        else:  # Norms and biases stay F32, as llama.cpp keeps them.
            stored, w_file = w, w
        held[hf_name] = (
            w_file - 1.0
            if w.ndim == 1 and arch.startswith("gemma") and (base.endswith("norm"))
            else w_file
        )
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = (
                config.num_attention_heads
                if base.endswith("q_proj")
                else (config.num_key_value_heads)
            )
            # Permuted after quantizing (whole rows move): the file holds the same values.
            stored = _permute(stored, heads)
        kind = gguf.GGMLQuantizationType[qtype] if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32 or kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"{gguf_name}.{suffix}", stored)
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.no_grad():
        for hf_name, w in held.items():
            state[hf_name].copy_(torch.from_numpy(w))
    if config.tie_word_embeddings:
        model.tie_weights()
    return path, model
