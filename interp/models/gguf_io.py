"""GGUF files (llama.cpp's format): a model's config, weights and tokenizer.

    hf_config, tensors, metadata = gguf_io.read("SmolLM2-135M-Instruct.Q4_1.gguf")

`pretrained.from_pretrained` calls this for a `.gguf` path (or a folder holding one file of
that kind) and goes on as for a Hugging Face folder: the file becomes the config.json dict and
the Hugging Face-named tensors that `hf_config.config_from_hf` and `hf_params.hf_to_params`
already read, so a GGUF model is the same `Transformer` a Hugging Face folder gives, and
`save_pretrained` exports it as one.

What llama.cpp's converter (`convert_hf_to_gguf.py`) changes, undone here:
- **Quantized weights** are dequantized to float32 with the `gguf` package's own NumPy
  reference (`gguf.quants.dequantize`; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
  Q3_K, Q4_K, Q5_K, Q6_K and what else it reads). A type it cannot read is an error naming it.
- **Llama's Q and K rows** are permuted for llama.cpp's rotary layout (adjacent pairs, where
  Hugging Face rotates the two halves of each head); the inverse permutation restores them.
  Only the `llama` architecture is permuted (Qwen and Gemma files keep Hugging Face's rows).
- **Gemma's RMSNorm weights** are stored as 1 + w; Hugging Face keeps w.
- **Settings llama.cpp fixes in code** rather than in the file are set the way llama.cpp runs
  the model (src/llama-model.cpp): Gemma's query scale 1/sqrt(head_dim) except the 27B models
  (1/sqrt(d_model / heads)), Gemma 2 slides on every other layer and Gemma 3 on five of six,
  Gemma 3's sliding layers rotate with base 10,000, and a Mistral file (architecture `llama`)
  attends over its whole context as llama.cpp does when the file names no sliding window.

Not read: Llama 3.1's frequency-dependent rope (`rope_freqs.weight`; an error), mixtures of
experts, and architectures other than llama (Llama, Mistral, SmolLM), qwen2, qwen3, gemma2 and
gemma3.

Reference: the GGUF specification, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np

from interp.models import gguf_tokenizer

# model_type in Hugging Face terms, per GGUF `general.architecture`.
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
_GEMMA = ("gemma2", "gemma3")
# Layers of the 27B models, for which llama.cpp scales queries by 1/sqrt(d_model / heads).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`).
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama-like blocks: the one norm before the MLP. Gemma: a norm on each side of both.
_BLOCK_LLAMA = {"ffn_norm": "post_attention_layernorm"}
_BLOCK_GEMMA = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_0-9]+)\.(weight|bias)$")


def find(path: str | os.PathLike) -> str:
    """The GGUF file a path names: the path itself, or the one `.gguf` file in a folder.

    Raises:
      FileNotFoundError: if the path does not exist, or a folder holds no `.gguf` file.
      ValueError: if a folder holds several (name the file instead).
    """
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if not names:
            raise FileNotFoundError(f"No .gguf file in {path}.")
        if len(names) > 1:
            raise ValueError(
                f"{path} holds several GGUF files ({', '.join(names)}); pass the path of the "
                "one to load."
            )
        return os.path.join(path, names[0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    return path


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a local `.gguf` file, or a local folder holding `.gguf` files and no
    config.json (a Hugging Face folder with a GGUF beside it loads as Hugging Face)."""
    path = os.path.expanduser(os.fspath(path))
    if "://" in path:
        return False
    if os.path.isdir(path):
        names = os.listdir(path)
        return "config.json" not in names and any(n.endswith(".gguf") for n in names)
    return path.endswith(".gguf")


def _reader(path: str):
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # gguf raises these for a short file.
        with open(path, "rb") as f:
            magic = f.read(4)
        why = (
            "a truncated download is the usual cause: fetch it again"
            if magic == b"GGUF"
            else f"it does not start with GGUF's magic bytes (it starts {magic!r}): not a GGUF "
            "file, whatever its name"
        )
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); {why}."
        ) from e


class _Tensors(Mapping[str, np.ndarray]):
    """Hugging Face name -> float32 array, dequantized (and un-permuted) on lookup, so that a
    model is converted one tensor at a time."""

    def __init__(self, path: str, reader, names: dict[str, Any], fix):
        self._path, self._reader, self._names, self._fix = path, reader, names, fix

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._names[name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"Tensor {tensor.name} of {self._path} is stored as "
                f"{tensor.tensor_type.name}, which the gguf package cannot dequantize "
                f"({e}); convert the file to another type (llama.cpp's llama-quantize)."
            ) from None
        return self._fix(tensor.name, np.asarray(values, np.float32))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` of q_proj / k_proj rows ([heads * hd, D]
    or a bias [heads * hd]): each head's rows (pair, half) back to (half, pair)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], Mapping[str, np.ndarray], dict]:
    """A GGUF model as a Hugging Face config.json dict and Hugging Face-named tensors.

    Args:
      path: A `.gguf` file, or a folder holding exactly one.

    Returns:
      (config.json dict, {HF tensor name: float32 array, dequantized on lookup}, the file's
      metadata as `gguf_tokenizer.read_metadata` gives it, for the tokenizer).

    Raises:
      FileNotFoundError: for a missing file.
      ValueError: for a file that is not GGUF or is truncated, an architecture or tensor type
        this module does not read, a tensor it does not know, or settings it cannot express
        (each named).
    """
    path = find(path)
    reader = _reader(path)
    meta = gguf_tokenizer.read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path} holds a model of architecture {arch!r}; GGUF loading supports "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            f"{path} stores rope frequency factors (rope_freqs.weight: Llama 3.1's 'llama3' "
            "rope scaling), which GGUF loading does not read yet; load the model's Hugging "
            "Face folder instead."
        )
    hf = _config(meta, arch, names, path)
    block = {**_BLOCK, **(_BLOCK_GEMMA if arch in _GEMMA else _BLOCK_LLAMA)}
    tensors = {}
    for name, tensor in names.items():
        match = _NAME.match(name)
        part = match and (block if match.group(1) is not None else _TOP).get(match.group(2))
        if not part:
            raise ValueError(
                f"{path} holds tensor {name!r}, which a {arch} model in GGUF loading does not "
                "have; the file is from a variant this loader does not read."
            )
        layer, _, kind = match.groups()
        prefix = f"model.layers.{layer}." if layer is not None else ""
        tensors[f"{prefix}{part}.{kind}"] = tensor
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]

    def fix(name: str, w: np.ndarray) -> np.ndarray:
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            return _unpermute(w, heads if ".attn_q." in name else kv_heads)
        if arch in _GEMMA and name.endswith("norm.weight"):
            return w - 1.0
        return w

    return hf, _Tensors(path, reader, tensors, fix), meta


def _config(meta: Mapping[str, Any], arch: str, names, path: str) -> dict[str, Any]:
    """The config.json dict of a GGUF file's metadata (llama.cpp's key names)."""

    def get(key, default=KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ValueError(f"{path} has no {arch}.{key}; the file's metadata is incomplete.")
        return value

    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    for key, value in (("head_count", heads), ("head_count_kv", kv_heads)):
        if isinstance(value, list):  # Per layer (hybrid models): only one value is modelled.
            if len(set(value)) != 1:
                raise ValueError(f"{path}: per-layer attention.{key} {value} is not supported.")
    heads = heads[0] if isinstance(heads, list) else heads
    kv_heads = kv_heads[0] if isinstance(kv_heads, list) else kv_heads
    d = get("embedding_length")
    head_dim = get("attention.key_length", d // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(
            f"{path}: attention.key_length {head_dim} != attention.value_length "
            f"{get('attention.value_length')}; keys and values of one width are modelled."
        )
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(
            f"{path}: rope.dimension_count {rotary} != head width {head_dim} (partial rotary "
            f"is not modelled for {arch})."
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None) or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = names["token_embd.weight"].shape[-1]
    layers = get("block_count")
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    theta = get("rope.freq_base", None)
    rope: dict[str, Any] = {"rope_type": "default"}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling == "yarn":
        rope = {
            "rope_type": "yarn",
            "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    elif scaling != "none":
        raise ValueError(f"{path}: rope.scaling.type {scaling!r} is not supported.")
    if theta is not None:
        rope["rope_theta"] = float(theta)
        hf["rope_theta"] = float(theta)
    hf["rope_parameters"] = rope
    hf["rope_scaling"] = None if rope["rope_type"] == "default" else dict(rope)
    window = get("attention.sliding_window", None)
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in names
        if window:  # Mistral 7B v0.1 style: every layer slides.
            hf.update(model_type="mistral", sliding_window=window)
            if hf["attention_bias"] or hf["mlp_bias"]:
                raise ValueError(f"{path}: a sliding-window llama with biases is not modelled.")
            del hf["attention_bias"], hf["mlp_bias"]
    elif arch in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    elif arch in _GEMMA:
        big = layers == _GEMMA_27B_LAYERS[arch]
        hf["query_pre_attn_scalar"] = d // heads if big else head_dim
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        pattern = _GEMMA_SLIDING_PATTERN[arch]
        kinds = get("attention.sliding_window_pattern", None)
        if isinstance(kinds, list):  # Newer files: one bool per layer (True: sliding).
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in kinds]
        else:
            pattern = int(kinds or pattern)
            hf["layer_types"] = [
                "sliding_attention" if i % pattern < pattern - 1 else "full_attention"
                for i in range(layers)
            ]
        hf["sliding_window"] = window
        if arch == "gemma2":
            hf["attn_logit_softcapping"] = get("attn_logit_softcapping", None)
            hf["final_logit_softcapping"] = get("final_logit_softcapping", None)
        else:
            hf["rope_local_base_freq"] = 10_000.0
            hf["final_logit_softcapping"] = get("final_logit_softcapping", None)
            hf["rope_parameters"] = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": rope,
            }
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        hf[f"{role}_token_id"] = meta.get(f"tokenizer.ggml.{key}_token_id")
    return hf
