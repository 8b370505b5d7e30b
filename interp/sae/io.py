"""SAE folders in the SAELens layout: `sae_weights.safetensors` + `cfg.json`.

    save("/out/sae", config, params, metadata={"hook_name": "blocks_6/resid_post"})
    sae, params = load("/out/sae")                       # ours, or any SAELens folder
    codes = sae.apply({"params": params}, x, method="encode")

    # The same folder in SAELens (torch):
    #   from sae_lens import SAE; SAE.load_from_disk("/out/sae").encode(torch.tensor(x))

Weights keep SAELens's names and layouts (W_enc [D, X], b_enc [X], W_dec [X, D], b_dec [D],
threshold [X]), stored as float32. `cfg.json` is a SAELens 6.x inference config (architecture,
d_in, d_sae, k, apply_b_dec_to_input, normalize_activations, dtype, device, metadata with
hook_name/model_name when given) plus our whole `SAEConfig` under "interp_config", which SAELens
ignores and `load` uses, so our own checkpoints come back with every training setting.

Architectures: relu <-> SAELens 'standard', topk <-> 'topk', jumprelu <-> 'jumprelu'. A
BatchTopK SAE infers with a per-latent threshold, so it is exported as 'jumprelu', exactly as
SAELens's `BatchTopKTrainingSAE.save_inference_model` does (metadata.training_architecture is
'batchtopk'); `load` turns such a folder back into a 'batchtopk' config. Matryoshka BatchTopK
likewise ('matryoshka_batchtopk', its widths in training_architecture_details). Each
architecture's names are in `interp.sae.architectures`.

`input_scale` is folded into the weights on export, as SAELens's
`fold_activation_norm_scaling_factor` does (W_enc * s, W_dec / s, b_dec / s, and
normalize_activations 'none'): with codes c = f((s x - b_dec) W_enc + b_enc) and reconstruction
(c W_dec + b_dec) / s, the folded SAE gives the same codes and reconstruction from raw
activations, so SAELens's `encode`/`decode` on raw activations equal ours. `load` unfolds it for
our own folders (exact when the scale is 1 or a power of two, else to float32 rounding).

Reading SAELens folders covers configs from before 6.0 (top-level hook_point/hook_name,
`activation_fn_str` 'relu' or 'topk' with `activation_fn_kwargs: {k}`, boolean
normalize_activations, a `scaling_factor` tensor) and 6.x (architecture-specific fields,
`metadata`, `rescale_acts_by_decoder_norm` for TopK, BatchTopK training checkpoints with a
scalar `topk_threshold`), per-token normalisation ('layer_norm', 'constant_norm_rescale':
`SAEConfig.normalize_activations`), hook_z SAEs (they read the site's rows, heads side by
side, `interp.models.sites`), per-head SAEs (`hook_head_index`), and transcoders ('transcoder',
'skip_transcoder', 'jumprelu_transcoder', 'jumprelu_skip_transcoder': d_out, W_skip and the
output site `hook_name_out` on the config). Gated, matryoshka and other architectures raise a
clear error.

Sites: the folder's `hook_name` (TransformerLens's names, as SAELens writes them) is read into
interp's vocabulary (`read_metadata`, and `SAEConfig.hook_name` / `hook_head_index` /
`output_hook_name` of the loaded SAE); `save` writes TransformerLens's name where one exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from interp import paths, safetensors_io
from interp.models import sites
from interp.sae.architectures import ARCHITECTURES
from interp.sae.modules import SAE, SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
CONFIG_KEY = "interp_config"
# SAELens treats a cfg.json without metadata.sae_lens_version as a pre-6.0 config and rewrites
# it (dropping the nested metadata); this marks the 6.x layout we write.
SAE_LENS_FORMAT_VERSION = "6.0.0"

# SAELens inference layouts -> ours (each architecture's own is `Architecture.sae_lens`); a
# 'batchtopk' cfg.json is a SAELens training config's name for a BatchTopK folder.
_FROM_SAE_LENS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
}
# Inference-time normalisations SAELens applies per token (SAEConfig.normalize_activations).
_PER_TOKEN_NORMS = ("layer_norm", "constant_norm_rescale")
# SAELens transcoder architectures -> (the encoder's architecture, skip connection), and back.
_TRANSCODERS_FROM_SAE_LENS = {
    "transcoder": ("standard", False),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_TRANSCODERS_TO_SAE_LENS = {v: k for k, v in _TRANSCODERS_FROM_SAE_LENS.items()}


def _expected_shapes(config: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, x, o = config.d_in, config.num_latents, config.output_width
    shapes = {"W_enc": (d, x), "b_enc": (x,), "W_dec": (x, o), "b_dec": (o,)}
    if config.arch.has_threshold:
        shapes["threshold"] = (x,)
    if config.skip_connection:
        shapes["W_skip"] = (o, d)
    return shapes


def _check_params(params: Mapping[str, Any], config: SAEConfig, where: str) -> None:
    """Raises ValueError naming missing, unexpected or mis-shaped tensors."""
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: a {config.architecture!r} SAE needs tensors {sorted(expected)}; "
            f"missing {missing}, unexpected {extra}."
        )
    for name, shape in expected.items():
        got = tuple(np.shape(params[name]))
        if got != shape:
            raise ValueError(
                f"{where}: {name} has shape {got}, expected {shape} for d_in={config.d_in}, "
                f"num_latents={config.num_latents}, d_out={config.output_width}."
            )


def _read_tensors(path: epath.Path) -> dict[str, np.ndarray]:
    """{name: float32 array}, copied out of the file (memory maps are not kept open)."""
    return {k: np.asarray(v, np.float32) for k, v in safetensors_io.read(path).items()}


def save(
    path: epath.PathLike,
    config: SAEConfig | SAE,
    params: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes an SAE folder that both `load` and SAELens (`SAE.load_from_disk`) read.

    Args:
      path: Folder (local or gs://); created if needed, its two files overwritten.
      config: The SAE's `SAEConfig` (or the `SAE` module).
      params: Its 'params' tree (W_enc, b_enc, W_dec, b_dec, and threshold for
        jumprelu/batchtopk), in the raw-activation convention of `interp.sae.modules`.
      metadata: Extra SAELens metadata, e.g. {'model_name': ..., 'hook_name': ...,
        'context_size': ...}; JSON-serialisable values.

    Raises:
      ValueError: when params do not match the config.
    """
    config = getattr(config, "config", config)
    params = {name: np.asarray(value, np.float64) for name, value in params.items()}
    _check_params(params, config, "save")
    # Fold input_scale (see the module docstring) in float64, then store float32.
    scale = float(config.input_scale)
    tensors = dict(params)
    tensors["W_enc"] = params["W_enc"] * scale
    tensors["W_dec"] = params["W_dec"] / scale
    tensors["b_dec"] = params["b_dec"] / scale
    tensors = {name: value.astype(np.float32) for name, value in tensors.items()}

    meta: dict[str, Any] = {"sae_lens_version": SAE_LENS_FORMAT_VERSION}
    if config.arch.training_architecture:  # As SAELens records a BatchTopK export.
        meta["training_architecture"] = config.arch.training_architecture
        meta["training_architecture_details"] = config.arch.training_details(config)
    for key, value in (
        ("hook_name", config.hook_name),
        ("hook_head_index", config.hook_head_index),
        ("hook_name_out", config.output_hook_name),
    ):
        if value is not None:
            meta[key] = value
    meta.update(metadata or {})
    site = meta.get("hook_name") if isinstance(meta.get("hook_name"), str) else None
    for key in ("hook_name", "hook_name_out"):  # SAELens and TransformerLens read TL names.
        if isinstance(meta.get(key), str):
            meta[key] = _transformer_lens_name(meta[key])
    architecture = config.arch.sae_lens
    if config.is_transcoder:
        key = (architecture, config.skip_connection)
        if key not in _TRANSCODERS_TO_SAE_LENS:
            raise ValueError(
                f"SAELens has no {config.architecture!r} transcoder layout; its transcoders are "
                "relu ('standard') or jumprelu, with or without a skip connection."
            )
        architecture = _TRANSCODERS_TO_SAE_LENS[key]
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": config.d_in,
        "d_sae": config.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": config.subtract_decoder_bias,
        # input_scale is folded into the weights; per-token normalisation is kept.
        "normalize_activations": config.normalize_activations,
        # An SAE on all heads of attn/z reads them side by side, as SAELens's hook_z SAEs do
        # once they flatten [..., N, H]: tell SAELens to.
        "reshape_activations": "hook_z" if _reads_all_heads_of_z(config, site) else "none",
        "metadata": meta,
    }
    if config.is_transcoder:
        cfg["d_out"] = config.output_width
    if config.architecture == "topk":
        cfg["k"] = config.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg[CONFIG_KEY] = config.to_dict()

    folder = paths.resolve(path)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_io.write(folder / WEIGHTS_FILE, tensors)
    # After the weights, and atomically: a new folder with a cfg.json has complete weights.
    paths.write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")


def _read_folder(path: epath.PathLike) -> tuple[epath.Path, dict[str, Any]]:
    folder = paths.resolve(path)
    if not folder.exists() or not folder.is_dir():
        raise FileNotFoundError(
            f"SAE folder {folder} does not exist; expected a folder with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (the SAELens layout)."
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            present = sorted(p.name for p in folder.iterdir())[:10]
            raise FileNotFoundError(
                f"{folder / name} is missing; an SAE folder holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (found {present})."
            )
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / CONFIG_FILE} must hold a JSON object.")
    return folder, raw


_META_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "hook_name_out",
    "hook_head_index_out",
    "context_size",
    "dataset_path",
    "prepend_bos",
)


def read_metadata(path: epath.PathLike) -> dict[str, Any]:
    """The SAELens metadata of a folder (model_name, hook_name, ...; {} if none).

    `hook_name` (and a transcoder's `hook_name_out`) are given in interp's vocabulary, so
    `run_with_hooks(model, params, tokens, capture=[meta["hook_name"]])` works on what a
    published folder says; the name as written, when it was a TransformerLens name, is kept
    as `transformer_lens_hook_name` (`transformer_lens_hook_name_out`). TransformerLens names
    whose site depends on the model (hook_q, hook_k: before rotary; hook_mlp_in: resid_pre
    in parallel-residual models) and names with no site here stay as written: `hooks.resolve`
    translates (or refuses) them with the model. Pre-6.0 configs keep these at the top level
    (hook_point is returned as hook_name, hook_point_head_index as hook_head_index).
    """
    _, raw = _read_folder(path)
    return _metadata(raw)


def _metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(raw.get("metadata") or {})
    for key in _META_KEYS:
        if key in raw and key not in meta:
            meta[key] = raw[key]
    if "hook_point" in raw and "hook_name" not in meta:
        meta["hook_name"] = raw["hook_point"]
    if "hook_point_head_index" in raw and "hook_head_index" not in meta:  # Before 6.0.
        meta["hook_head_index"] = raw["hook_point_head_index"]
    for key in ("hook_name", "hook_name_out"):
        name = meta.get(key)
        if not (isinstance(name, str) and sites.is_transformer_lens_name(name)):
            continue
        meta[f"transformer_lens_{key}"] = name
        if sites.depends_on_model(name):
            continue  # Translated against the model where it is used (hooks.resolve).
        try:
            meta[key] = sites.from_transformer_lens(name)
        except sites.UnknownTransformerLensName as error:
            logging.warning("%s stays as written: %s", key, error)
    return meta


def _reads_all_heads_of_z(config: SAEConfig, name: str | None) -> bool:
    name = name or ""
    if sites.is_transformer_lens_name(name) and not sites.depends_on_model(name):
        name = sites.from_transformer_lens(name)
    return name.endswith("attn/z") and config.hook_head_index is None and not config.is_transcoder


def _transformer_lens_name(name: str) -> str:
    """A site's TransformerLens name for export, or the name as given if it has none.

    attn/q and attn/k stay ours: TransformerLens names them hook_rot_q in rotary models and
    hook_q otherwise, which an SAE folder alone cannot tell.
    """
    if sites.is_transformer_lens_name(name) or name.endswith(("attn/q", "attn/k")):
        return name
    try:
        return sites.to_transformer_lens(name)
    except ValueError:
        return name


def load(path: epath.PathLike) -> tuple[SAE, dict[str, jnp.ndarray]]:
    """Loads an SAE folder written by `save` or by SAELens (any version from 3.x to 6.x).

    Args:
      path: Folder (local or gs://) with cfg.json and sae_weights.safetensors; or
        hf://org/repo/path/in/repo, an SAE folder in a Hub repository, of any format
        `interp.sae.released` reads (SAELens, Gemma Scope's params.npz, sparsify).

    Returns:
      (SAE module, its 'params' as float32 jax arrays): `sae.apply({'params': params}, x,
      method='encode')` gives codes of raw activations x [..., D].

    Raises:
      FileNotFoundError: for a missing folder or file.
      ValueError: for an unsupported architecture or normalisation, or weights whose names
        or shapes do not match the config.
    """
    if os.fspath(path).startswith("hf://"):
        from interp.sae import released  # noqa: PLC0415  (it builds on this module)

        return released.load_hf(os.fspath(path))
    folder, raw = _read_folder(path)
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    where = os.fspath(folder)
    meta = _metadata(raw)
    if CONFIG_KEY in raw:
        config = SAEConfig.from_dict(raw[CONFIG_KEY])
        if config.hook_name is None and isinstance(meta.get("hook_name"), str):
            config = config.replace(hook_name=meta["hook_name"])  # Saved before the field.
        _check_params(tensors, config, where)
        scale = float(config.input_scale)
        params = {name: value.astype(np.float64) for name, value in tensors.items()}
        params["W_enc"] = params["W_enc"] / scale
        params["W_dec"] = params["W_dec"] * scale
        params["b_dec"] = params["b_dec"] * scale
        tensors = {name: value.astype(np.float32) for name, value in params.items()}
    else:
        config, tensors = _from_sae_lens(raw, meta, tensors, where)
        _check_params(tensors, config, where)
    return SAE(config), {name: jnp.asarray(value) for name, value in tensors.items()}


def _from_sae_lens(
    raw: Mapping[str, Any], meta: Mapping[str, Any], tensors: dict[str, np.ndarray], where: str
) -> tuple[SAEConfig, dict[str, np.ndarray]]:
    """Our config and params from a SAELens cfg.json and weights (pre-6.0 or 6.x)."""
    cfg = dict(raw)
    if "activation_fn_str" in cfg:  # Pre-6.0 name.
        cfg.setdefault("activation_fn", cfg["activation_fn_str"])
    architecture = cfg.get("architecture") or "standard"
    activation = cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture == "standard" and activation == "topk":  # Pre-6.0 TopK.
        architecture = "topk"
    transcoder = _TRANSCODERS_FROM_SAE_LENS.get(architecture)
    if transcoder is not None:
        architecture = transcoder[0]
    if architecture == "gated":
        raise ValueError(
            f"{where}: gated SAEs are not supported (SAEConfig architectures: "
            f"{', '.join(ARCHITECTURES)})."
        )
    if architecture not in _FROM_SAE_LENS:
        raise ValueError(
            f"{where}: unknown or unsupported SAELens architecture {architecture!r}; supported: "
            f"{sorted(_FROM_SAE_LENS) + sorted(_TRANSCODERS_FROM_SAE_LENS)} (gated and other "
            "variants are not; Matryoshka folders are 'jumprelu' ones)."
        )
    if architecture == "standard" and activation != "relu":
        raise ValueError(
            f"{where}: SAELens 'standard' SAE with activation_fn {activation!r} is not "
            "supported (only 'relu' and 'topk')."
        )
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{where}: cfg.json needs an integer {key!r}, got {cfg.get(key)!r}.")

    ours = _FROM_SAE_LENS[architecture]
    k = cfg.get("k", kwargs.get("k"))
    details = meta.get("training_architecture_details") or {}
    trained_as = ARCHITECTURES.get(meta.get("training_architecture"))
    if ours == "jumprelu" and trained_as is not None and trained_as.sae_lens == "jumprelu":
        if "k" in details:  # A SAELens BatchTopK (or Matryoshka) export (see docstring).
            ours, k = trained_as.name, details["k"]
        if ours == "matryoshka_batchtopk" and not details.get("matryoshka_widths"):
            ours = "batchtopk"  # Its levels unrecorded: the same inference, no nesting to train.
    if ARCHITECTURES[ours].sparsity == "k" and k is None:
        raise ValueError(f"{where}: a {architecture!r} SAE needs 'k' in cfg.json.")

    normalize = _normalization(cfg.get("normalize_activations"), where)

    tensors = dict(tensors)
    # Pre-6.0 fine-tuning scale multiplies codes before the decoder: fold it into W_dec rows.
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            factor = tensors.pop(name)
            if "W_dec" in tensors and factor.shape == tensors["W_dec"].shape[:1]:
                tensors["W_dec"] = tensors["W_dec"] * factor[:, None]
            elif not np.allclose(factor, 1.0):
                raise ValueError(f"{where}: {name} has shape {factor.shape}, expected [d_sae].")
    if "topk_threshold" in tensors:  # A SAELens BatchTopK training checkpoint: one threshold.
        tensors["threshold"] = np.full((cfg["d_sae"],), float(tensors.pop("topk_threshold")))
    if cfg.get("rescale_acts_by_decoder_norm") and {"W_enc", "b_enc", "W_dec"} <= set(tensors):
        # TopK on pre-activations times decoder norms, codes divided by them before decoding:
        # folding the norms (as SAELens's fold_W_dec_norm) gives the same codes and output.
        norms = np.maximum(np.linalg.norm(tensors["W_dec"], axis=-1), 1e-8)
        tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]

    fields = dict(
        architecture=ours,
        d_in=cfg["d_in"],
        num_latents=cfg["d_sae"],
        subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        hook_name=_site(meta.get("hook_name")),
        hook_head_index=meta.get("hook_head_index"),
    )
    if transcoder is not None:
        if not isinstance(cfg.get("d_out"), int):
            raise ValueError(f"{where}: a transcoder's cfg.json needs an integer 'd_out'.")
        fields.update(
            d_out=cfg["d_out"],
            skip_connection=transcoder[1],
            subtract_decoder_bias=False,  # SAELens's transcoders never subtract b_dec.
            output_hook_name=_site(meta.get("hook_name_out")),
        )
        if meta.get("hook_head_index_out") is not None:
            raise ValueError(f"{where}: transcoders writing one head (hook_head_index_out) "
                             "are not supported.")  # fmt: skip
    if k is not None and ARCHITECTURES[ours].sparsity == "k":
        fields["k"] = int(round(k))  # SAELens's BatchTopK k may be a float (a mean).
    if ours == "matryoshka_batchtopk":
        fields["matryoshka_widths"] = tuple(int(w) for w in details["matryoshka_widths"])
    config = SAEConfig(**fields)
    return config, {name: value.astype(np.float32) for name, value in tensors.items()}


def _site(name: Any) -> str | None:
    """A hook name from metadata (in interp's vocabulary where that needs no model)."""
    return name if isinstance(name, str) and name else None


def _normalization(normalize, where: str) -> str:
    """Our `normalize_activations` for SAELens's."""
    if normalize in (None, False, "none"):
        return "none"
    if normalize in _PER_TOKEN_NORMS:
        return normalize  # Applied per token by the SAE module, as SAELens does.
    if normalize not in ("expected_average_only_in", True, "covariance_whitening"):
        raise ValueError(
            f"{where}: unknown normalize_activations={normalize!r}; SAELens's are none, "
            f"expected_average_only_in, {', '.join(_PER_TOKEN_NORMS)}, covariance_whitening."
        )
    # 'expected_average_only_in' (or True, before 6.0) and 'covariance_whitening' are no-ops
    # in SAELens's own encode of a folder loaded from disk (training folds them on export),
    # so they are no-ops here too, and encodings match SAELens's.
    logging.warning(
        "%s: normalize_activations=%r was not folded into the weights; like SAELens, this SAE "
        "encodes activations as given. Scale inputs yourself if it was trained on normalised ones.",
        where,
        normalize,
    )
    return "none"
