"""Hugging Face state dicts <-> our parameters, one name map per family.

Families are those of `hf_config.SUPPORTED`; the Llama-like ones (all but gpt2 and gpt_neox)
share one name map. Conversion is pure NumPy and exact: `params_to_hf(hf_to_params(t, c), c)`
is bit-identical to `t`. Folders (safetensors files, from_pretrained/save_pretrained) are in
`pretrained.py`.

Weight layouts, with the legend of `transformer.py`: HF `nn.Linear` weights are [out, in];
GPT-2 `Conv1D` weights are [in, out]; GPT-NeoX fuses q, k, v into one [3 * N * H, D] matrix laid
out head by head, [q_0, k_0, v_0, q_1, ...]. Ours: q/k/v kernels [D, N, H], o kernel [N, H, D],
MLP kernels [D, F] / [F, D], lm_head [D, V]. Tied embeddings have no lm_head.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from interp.models.config import ModelConfig
from interp.models.hf_config import SUPPORTED

# Non-persistent buffers that old checkpoints carry: causal masks and rotary tables.
_IGNORED = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "gpt_neox": re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
}
_ROTARY_BUFFER = re.compile(r"\.rotary_emb\.(\w+_)?inv_freq$")  # Llama-like families
_LM_HEAD = {"gpt2": "lm_head.weight", "gpt_neox": "embed_out.weight"}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the parameter(s) it holds."""

    name: str
    shape: tuple[int, ...]
    paths: tuple[str, ...]  # '/'-joined parameter paths
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _reshaped(name, path, hf_shape, our_shape) -> _Tensor:
    """Same element order (biases, norms, embeddings, Conv1D [in, out] kernels)."""
    return _Tensor(
        name,
        tuple(hf_shape),
        (path,),
        lambda w: (w.reshape(our_shape),),
        lambda w: w.reshape(hf_shape),
    )


def _linear(name, path, hf_shape, our_shape) -> _Tensor:
    """An nn.Linear weight [out, in]; ours is [in, out] with in/out possibly split."""
    return _Tensor(
        name,
        tuple(hf_shape),
        (path,),
        lambda w: (w.T.reshape(our_shape),),
        lambda w: w.reshape(hf_shape[::-1]).T,
    )


def _norm(prefix, path, config) -> list[_Tensor]:
    d = (config.d_model,)
    out = [_reshaped(f"{prefix}.weight", f"{path}/scale", d, d)]
    if config.norm == "layernorm":
        out.append(_reshaped(f"{prefix}.bias", f"{path}/bias", d, d))
    return out


def _gpt2_map(c: ModelConfig, prefix: str) -> list[_Tensor]:
    d, n, h, f = c.d_model, c.num_heads, c.head_dim, c.mlp_dim
    out = [
        _reshaped(f"{prefix}wte.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        _reshaped(f"{prefix}wpe.weight", "pos_embed", (c.max_len, d), (c.max_len, d)),
        *_norm(f"{prefix}ln_f", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"{prefix}h.{i}", f"blocks_{i}"
        qkv = [f"{ours}/attn/{x}_kernel" for x in "qkv"]
        qkv_bias = [f"{ours}/attn/{x}_bias" for x in "qkv"]
        out += [
            *_norm(f"{hf}.ln_1", f"{ours}/ln_1", c),
            *_norm(f"{hf}.ln_2", f"{ours}/ln_2", c),
            # Conv1D c_attn: [D, 3D], columns q | k | v.
            _Tensor(
                f"{hf}.attn.c_attn.weight",
                (d, 3 * d),
                tuple(qkv),
                lambda w: tuple(p.reshape(d, n, h) for p in np.split(w, 3, axis=1)),
                lambda *ws: np.concatenate([w.reshape(d, d) for w in ws], axis=1),
            ),
            _Tensor(
                f"{hf}.attn.c_attn.bias",
                (3 * d,),
                tuple(qkv_bias),
                lambda b: tuple(p.reshape(n, h) for p in np.split(b, 3)),
                lambda *bs: np.concatenate([b.reshape(d) for b in bs]),
            ),
            _reshaped(f"{hf}.attn.c_proj.weight", f"{ours}/attn/o_kernel", (d, d), (n, h, d)),
            _reshaped(f"{hf}.attn.c_proj.bias", f"{ours}/attn/o_bias", (d,), (d,)),
            _reshaped(f"{hf}.mlp.c_fc.weight", f"{ours}/mlp/up_kernel", (d, f), (d, f)),
            _reshaped(f"{hf}.mlp.c_fc.bias", f"{ours}/mlp/up_bias", (f,), (f,)),
            _reshaped(f"{hf}.mlp.c_proj.weight", f"{ours}/mlp/down_kernel", (f, d), (f, d)),
            _reshaped(f"{hf}.mlp.c_proj.bias", f"{ours}/mlp/down_bias", (d,), (d,)),
        ]
    return out


def _neox_map(c: ModelConfig) -> list[_Tensor]:
    d, n, h, f = c.d_model, c.num_heads, c.head_dim, c.mlp_dim
    p = "gpt_neox."
    out = [
        _reshaped(f"{p}embed_in.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        *_norm(f"{p}final_layer_norm", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"{p}layers.{i}", f"blocks_{i}"
        out += [
            *_norm(f"{hf}.input_layernorm", f"{ours}/ln_1", c),
            *_norm(f"{hf}.post_attention_layernorm", f"{ours}/ln_2", c),
            # Rows are per head [q_h, k_h, v_h]: view as [N, 3, H, D].
            _Tensor(
                f"{hf}.attention.query_key_value.weight",
                (3 * d, d),
                tuple(f"{ours}/attn/{x}_kernel" for x in "qkv"),
                lambda w: tuple(w.reshape(n, 3, h, d)[:, j].transpose(2, 0, 1) for j in range(3)),
                lambda *ws: np.stack([w.transpose(1, 2, 0) for w in ws], 1).reshape(3 * d, d),
            ),
            _linear(f"{hf}.attention.dense.weight", f"{ours}/attn/o_kernel", (d, d), (n, h, d)),
            _linear(f"{hf}.mlp.dense_h_to_4h.weight", f"{ours}/mlp/up_kernel", (f, d), (d, f)),
            _reshaped(f"{hf}.mlp.dense_h_to_4h.bias", f"{ours}/mlp/up_bias", (f,), (f,)),
            _linear(f"{hf}.mlp.dense_4h_to_h.weight", f"{ours}/mlp/down_kernel", (d, f), (f, d)),
            _reshaped(f"{hf}.mlp.dense_4h_to_h.bias", f"{ours}/mlp/down_bias", (d,), (d,)),
        ]
        if c.attn_bias:
            out += [
                _Tensor(
                    f"{hf}.attention.query_key_value.bias",
                    (3 * d,),
                    tuple(f"{ours}/attn/{x}_bias" for x in "qkv"),
                    lambda b: tuple(b.reshape(n, 3, h)[:, j] for j in range(3)),
                    lambda *bs: np.stack(bs, 1).reshape(3 * d),
                ),
                _reshaped(f"{hf}.attention.dense.bias", f"{ours}/attn/o_bias", (d,), (d,)),
            ]
    return out


def _llama_map(c: ModelConfig) -> list[_Tensor]:
    """Llama-like families: Llama, Qwen 2/3, Mistral, Gemma 2/3 (Gemma adds two post-norms and
    renames the pre-MLP norm; Qwen 3 and Gemma 3 have per-head q/k norms)."""
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    out = [
        _reshaped("model.embed_tokens.weight", "embed", (c.vocab_size, d), (c.vocab_size, d)),
        *_norm("model.norm", "ln_f", c),
    ]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", f"blocks_{i}"
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        out += _norm(f"{hf}.input_layernorm", f"{ours}/ln_1", c)
        if c.post_norms:
            out += _norm(f"{hf}.post_attention_layernorm", f"{ours}/post_attn_norm", c)
            out += _norm(f"{hf}.pre_feedforward_layernorm", f"{ours}/ln_2", c)
            out += _norm(f"{hf}.post_feedforward_layernorm", f"{ours}/post_mlp_norm", c)
        else:
            out += _norm(f"{hf}.post_attention_layernorm", f"{ours}/ln_2", c)
        for x, heads in (("q", n), ("k", k), ("v", k)):
            out.append(
                _linear(
                    f"{attn}.{x}_proj.weight",
                    f"{ours}/attn/{x}_kernel",
                    (heads * h, d),
                    (d, heads, h),
                )
            )
            if c.attn_bias:
                out.append(
                    _reshaped(
                        f"{attn}.{x}_proj.bias", f"{ours}/attn/{x}_bias", (heads * h,), (heads, h)
                    )
                )
        if c.qk_norm:
            for x in "qk":
                path = f"{ours}/attn/{x}_norm"
                out.append(_reshaped(f"{attn}.{x}_norm.weight", f"{path}/scale", (h,), (h,)))
                if c.norm == "layernorm":
                    out.append(_reshaped(f"{attn}.{x}_norm.bias", f"{path}/bias", (h,), (h,)))
        out.append(_linear(f"{attn}.o_proj.weight", f"{ours}/attn/o_kernel", (d, n * h), (n, h, d)))
        if c.attn_out_bias:
            out.append(_reshaped(f"{attn}.o_proj.bias", f"{ours}/attn/o_bias", (d,), (d,)))
        for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            out.append(
                _linear(f"{mlp}.{x}_proj.weight", f"{ours}/mlp/{x}_kernel", shape, shape[::-1])
            )
            if c.mlp_bias:
                out.append(
                    _reshaped(f"{mlp}.{x}_proj.bias", f"{ours}/mlp/{x}_bias", shape[:1], shape[:1])
                )
    return out


def _name_map(config: ModelConfig, gpt2_prefix: str = "transformer.") -> list[_Tensor]:
    family = config.family
    if family == "gpt2":
        out = _gpt2_map(config, gpt2_prefix)
    elif family == "gpt_neox":
        out = _neox_map(config)
    elif family in SUPPORTED:
        out = _llama_map(config)
    else:
        raise ValueError(
            f"No Hugging Face name map for family {config.family!r}; supported: "
            f"{sorted(SUPPORTED)}."
        )
    if not config.tied_embeddings:
        v, d = config.vocab_size, config.d_model
        out.append(_linear(_LM_HEAD.get(family, "lm_head.weight"), "lm_head", (v, d), (d, v)))
    return out


def _where(source: str | Mapping[str, str], name: str | None = None) -> str:
    if isinstance(source, str):
        return source
    if name is not None and name in source:
        return source[name]
    return ", ".join(sorted(set(source.values()))) or "no files"


# Multimodal Gemma 3 (Gemma3ForConditionalGeneration) holds Gemma3ForCausalLM's tensors under
# these prefixes (saved; in memory), next to a vision tower and projector that we do not load.
_GEMMA3_LANGUAGE_MODEL = ("language_model.model.", "model.language_model.")
_GEMMA3_RENAMES = (*((p, "model.") for p in _GEMMA3_LANGUAGE_MODEL), ("language_model.", ""))
_GEMMA3_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _gemma3_language_model(tensors, source):
    """The language model's tensors of a multimodal Gemma 3, named as in Gemma3ForCausalLM."""
    out, where = {}, {}
    for name, value in tensors.items():
        if _GEMMA3_VISION.match(name):
            continue
        new = next((r + name[len(p) :] for p, r in _GEMMA3_RENAMES if name.startswith(p)), name)
        out[new] = value
        where[new] = source if isinstance(source, str) else source.get(name, "")
    return out, where


def hf_to_params(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    source: str | Mapping[str, str] = "the given tensors",
) -> dict[str, Any]:
    """Our parameter tree from a Hugging Face state dict.

    Args:
      tensors: {HF tensor name: array} (NumPy or anything `np.asarray` takes).
      config: The model's config; `family` selects the name map. Parameters are stored in
        `config.param_dtype`.
      source: For error messages: the file the tensors came from, or {name: file}.

    Returns:
      Nested dicts of NumPy arrays, the `params` of `Transformer(config)`.

    Raises:
      ValueError: naming a missing tensor, a leftover tensor, or a shape mismatch (with both
        shapes and the file).
    """
    family = config.family
    names = dict.fromkeys(tensors)
    if family == "gpt_neox" and "lm_head.weight" in names:  # transformers 5 in-memory name
        tensors = dict(tensors)
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
        source = (
            source
            if isinstance(source, str)
            else {**source, "embed_out.weight": source.get("lm_head.weight", "")}
        )
        names = dict.fromkeys(tensors)
    if family == "gemma3_text" and any(n.startswith(_GEMMA3_LANGUAGE_MODEL) for n in names):
        tensors, source = _gemma3_language_model(tensors, source)
        names = dict.fromkeys(tensors)
    prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    entries = _name_map(config, gpt2_prefix=prefix)
    expected = {e.name for e in entries}
    missing = [e for e in entries if e.name not in names]
    if missing:
        lines = []
        for e in missing[:5]:
            close = difflib.get_close_matches(e.name, list(names), n=2)
            hint = f" (similar names present: {close})" if close else ""
            lines.append(f"{e.name!r} (expected shape {e.shape}){hint}")
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"Missing tensor(s) for a {family} model in {_where(source)}: {', '.join(lines)}{more}."
        )
    ignored = _IGNORED.get(family, _ROTARY_BUFFER)
    leftover = [n for n in names if n not in expected and not (ignored and ignored.search(n))]
    head = _LM_HEAD.get(family, "lm_head.weight")
    if config.tied_embeddings and head in leftover:
        # Some exporters write the tied head anyway; accept it only if it really is tied.
        embed = next(e.name for e in entries if e.paths == ("embed",))
        if not np.array_equal(np.asarray(tensors[head]), np.asarray(tensors[embed])):
            raise ValueError(
                f"Tensor {head!r} in {_where(source, head)} differs from {embed!r}, but the "
                "config ties the embeddings (tie_word_embeddings=True)."
            )
        leftover.remove(head)
    if leftover:
        shown = ", ".join(
            f"{n!r} (shape {tuple(np.shape(tensors[n]))}, in {_where(source, n)})"
            for n in leftover[:5]
        )
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ValueError(
            f"Unexpected tensor(s) that a {family} model with this config does not use: "
            f"{shown}{more}. Does config.json match the weights?"
        )
    params: dict[str, Any] = {}
    dtype = config.storage_dtype
    for e in entries:
        value = tensors[e.name]
        if tuple(value.shape) != e.shape:
            raise ValueError(
                f"Tensor {e.name!r} in {_where(source, e.name)} has shape "
                f"{tuple(value.shape)}; expected {e.shape} from the config."
            )
        for path, array in zip(e.paths, e.to_ours(np.asarray(value)), strict=True):
            *parents, leaf = path.split("/")
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            # A C-ordered copy: never a view into a memory-mapped file.
            node[leaf] = np.array(array, dtype=dtype, order="C")
    return params


def params_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of our params; the exact inverse of `hf_to_params`.

    Arrays keep the params' dtype. Raises ValueError for a missing, extra or misshapen param.
    """
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    entries = _name_map(config)
    used = {p for e in entries for p in e.paths}
    missing = sorted(used - set(flat))
    extra = sorted(set(flat) - used)
    if missing or extra:
        raise ValueError(
            f"Params do not match ModelConfig(family={config.family!r}): missing {missing}, "
            f"unexpected {extra}."
        )
    out = {}
    for e in entries:
        value = np.ascontiguousarray(e.to_hf(*(np.asarray(flat[p]) for p in e.paths)))
        if value.shape != e.shape:
            raise ValueError(
                f"Params for {e.name!r} ({', '.join(e.paths)}) give shape {value.shape}; "
                f"expected {e.shape}."
            )
        out[e.name] = value
    return out
