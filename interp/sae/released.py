"""Released SAEs by name: SAELens's release / id vocabulary, Hub folders, native formats.

    release, sae_id = "gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82"
    sae, params = released.load_pretrained(release, sae_id)
    sae.config.hook_name  # 'blocks_12/resid_post': the site, in interp's vocabulary
    sae, params = interp.sae.load(f"hf://google/{release}/{sae_id}")  # any folder on the Hub

A release is a Hub repository of SAE folders for one model (`RELEASES`: repository, the id
pattern, the folder of an id, the model, the site of an id, the format; the facts come from the
repositories' model cards and SAELens's `pretrained_saes.yaml`, named in each entry). Folders
come through `huggingface_hub` (its cache, `HF_HUB_OFFLINE`, `HF_TOKEN`), only the one folder's
files. Formats, each converted exactly to `SAEConfig` and SAELens-named params:

- **saelens**: `cfg.json` + `sae_weights.safetensors` (`interp.sae.io.load`).
- **gemma_scope**: Gemma Scope's `params.npz` (W_enc [D, X], W_dec [X, D], b_enc, b_dec,
  threshold): a JumpReLU SAE that does not subtract b_dec from its input (Lieberum et al.
  2024, "Gemma Scope", arXiv:2408.05147; SAELens's `gemma_2` conversion).
- **sparsify**: EleutherAI sparsify's `cfg.json` + `sae.safetensors` (encoder.weight [X, D],
  encoder.bias [X], W_dec [X, D], b_dec [D], W_skip [D, D] with a skip connection): a TopK SAE
  that subtracts b_dec from its input (a transcoder does not), top-k of ReLU(pre-activations).

A name that is not in the registry is an error listing the nearest names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from typing import Any

import numpy as np

from interp import safetensors_io
from interp.sae import io
from interp.sae.modules import SAE, SAEConfig

HF_PREFIX = "hf://"


@dataclasses.dataclass(frozen=True)
class Release:
    """A released suite of SAEs in one Hub repository.

    Attributes:
      repo_id: The Hub repository.
      model: The model the SAEs read (a Hub id).
      id_pattern: Regex an SAE id must match in full; its named groups fill `folder` and `site`.
      folder: The id's folder in the repository (format string over the groups).
      site: The id's site in interp's vocabulary (format string over the groups).
      format: 'saelens', 'gemma_scope' or 'sparsify'.
      source: Where these facts come from.
    """

    repo_id: str
    model: str
    id_pattern: str
    folder: str
    site: str
    format: str
    source: str


def _gemma_scope(size: str, kind: str, tuned: str = "pt") -> Release:
    site = {"res": "resid_post", "mlp": "mlp/out", "att": "attn/z"}[kind]
    return Release(
        repo_id=f"google/gemma-scope-{size}-{tuned}-{kind}",
        model=f"google/gemma-2-{size}" + ("-it" if tuned == "it" else ""),
        id_pattern=r"layer_(?P<layer>\d+)/width_(?P<width>\d+[km])/average_l0_(?P<l0>\d+)",
        folder="layer_{layer}/width_{width}/average_l0_{l0}",
        site="blocks_{layer}/" + site,
        format="gemma_scope",
        source=f"https://huggingface.co/google/gemma-scope-{size}-{tuned}-{kind} (model card; "
        "SAELens pretrained_saes.yaml, conversion gemma_2)",
    )


RELEASES: dict[str, Release] = {
    **{
        f"gemma-scope-{size}-pt-{kind}": _gemma_scope(size, kind)
        for size in ("2b", "9b")
        for kind in ("res", "mlp", "att")
    },
    "gemma-scope-27b-pt-res": _gemma_scope("27b", "res"),
    "gemma-scope-9b-it-res": _gemma_scope("9b", "res", "it"),
    "gpt2-small-res-jb": Release(
        repo_id="jbloom/GPT2-Small-SAEs-Reformatted",
        model="openai-community/gpt2",
        id_pattern=r"blocks\.(?P<layer>\d+)\.hook_resid_pre",
        folder="blocks.{layer}.hook_resid_pre",
        site="blocks_{layer}/resid_pre",
        format="saelens",
        source="https://huggingface.co/jbloom/GPT2-Small-SAEs-Reformatted (SAELens "
        "pretrained_saes.yaml, release gpt2-small-res-jb)",
    ),
    "sparsify-llama-3-8b-32x": Release(
        repo_id="EleutherAI/sae-llama-3-8b-32x",
        model="meta-llama/Meta-Llama-3-8B",
        id_pattern=r"layers\.(?P<layer>\d+)",
        folder="layers.{layer}",
        site="blocks_{layer}/resid_post",  # sparsify's hookpoint layers.N: block N's output.
        format="sparsify",
        source="https://github.com/EleutherAI/sparsify (README: load_from_hub("
        "'EleutherAI/sae-llama-3-8b-32x', hookpoint='layers.10'))",
    ),
}


def load_pretrained(
    release: str, sae_id: str, *, revision: str | None = None
) -> tuple[SAE, dict[str, Any]]:
    """Loads a released SAE by SAELens's release name and SAE id.

    Args:
      release: A key of `RELEASES`, e.g. 'gemma-scope-2b-pt-res'.
      sae_id: The SAE's id in that release, e.g. 'layer_12/width_16k/average_l0_82'.
      revision: The repository's branch, tag or commit (default: main).

    Returns:
      (SAE module, params) as `interp.sae.load`; `sae.config.hook_name` is the release's site.

    Raises:
      KeyError: a release or id that is not in the registry, with the nearest names.
      FileNotFoundError / PermissionError: as `interp.models.hub.resolve`.
    """
    if release not in RELEASES:
        near = difflib.get_close_matches(release, RELEASES, n=5, cutoff=0.3)
        raise KeyError(
            f"No release {release!r}; nearest: {near or sorted(RELEASES)} (all: "
            "interp.sae.released.RELEASES)."
        )
    entry = RELEASES[release]
    match = re.fullmatch(entry.id_pattern, sae_id)
    if match is None:
        raise KeyError(
            f"{sae_id!r} is not an SAE id of {release}; ids look like {entry.folder!r} "
            f"(pattern {entry.id_pattern})."
        )
    folder = _fetch(entry.repo_id, entry.folder.format(**match.groupdict()), revision)
    sae, params = load_folder(folder, entry.format)
    config = sae.config.replace(hook_name=entry.site.format(**match.groupdict()))
    return SAE(config), params


def load_hf(url: str, *, revision: str | None = None) -> tuple[SAE, dict[str, Any]]:
    """Loads `hf://org/repo/path/in/repo` (an SAE folder inside a Hub repository), of any
    format `load_folder` reads."""
    parts = url.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not url.startswith(HF_PREFIX):
        raise ValueError(f"{url!r} is not hf://org/repo[/path/in/repo].")
    repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
    return load_folder(_fetch(repo_id, path, revision))


def _fetch(repo_id: str, path: str, revision: str | None) -> str:
    """The local folder of `path` in the repository (only its files fetched)."""
    from interp.models import hub  # noqa: PLC0415

    snapshot = hub.snapshot(repo_id, revision, allow_patterns=[f"{path}/*" if path else "*"])
    folder = os.path.join(snapshot, path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{repo_id}@{revision or 'main'} has no folder {path!r} (or it is not in the cache "
            "in offline mode); check the SAE id."
        )
    return folder


def detect_format(folder: str) -> str:
    """'saelens', 'gemma_scope' or 'sparsify' from a folder's files.

    Raises:
      ValueError: for a folder of none of these formats, listing its files.
    """
    names = set(os.listdir(folder))
    if {"cfg.json", io.WEIGHTS_FILE} <= names:
        return "saelens"
    if "params.npz" in names:
        return "gemma_scope"
    if {"cfg.json", "sae.safetensors"} <= names:
        return "sparsify"
    raise ValueError(
        f"{folder} is not an SAE folder of a known format (files {sorted(names)[:10]}); "
        "expected cfg.json + sae_weights.safetensors (SAELens), params.npz (Gemma Scope) or "
        "cfg.json + sae.safetensors (sparsify)."
    )


def load_folder(folder: str, format: str | None = None) -> tuple[SAE, dict[str, Any]]:  # noqa: A002
    """Loads a local SAE folder of any supported format (detected when None)."""
    format = format or detect_format(folder)  # noqa: A001
    if format == "saelens":
        return io.load(folder)
    if format == "gemma_scope":
        return _gemma_scope_folder(folder)
    if format == "sparsify":
        return _sparsify_folder(folder)
    raise ValueError(f"Unknown SAE format {format!r}; known: saelens, gemma_scope, sparsify.")


def _finish(config: SAEConfig, tensors: dict[str, np.ndarray], where: str):
    import jax.numpy as jnp  # noqa: PLC0415

    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    io._check_params(tensors, config, where)
    return SAE(config), {k: jnp.asarray(v) for k, v in tensors.items()}


def _gemma_scope_folder(folder: str):
    """Gemma Scope's params.npz: JumpReLU, b_dec not subtracted from the input."""
    path = os.path.join(folder, "params.npz")
    with np.load(path) as data:
        tensors = {("W_" + k[2:] if k.startswith("w_") else k): data[k] for k in data.files}
    if "W_enc" not in tensors or "threshold" not in tensors:
        raise ValueError(f"{path} holds {sorted(tensors)}; Gemma Scope's are W_enc, W_dec, "
                         "b_enc, b_dec, threshold.")  # fmt: skip
    d, x = tensors["W_enc"].shape
    config = SAEConfig(architecture="jumprelu", d_in=d, num_latents=x, subtract_decoder_bias=False)
    return _finish(config, tensors, path)


def _sparsify_folder(folder: str):
    """sparsify's cfg.json + sae.safetensors: TopK of ReLU pre-activations."""
    cfg = json.loads(open(os.path.join(folder, "cfg.json")).read())
    raw = safetensors_io.read(os.path.join(folder, "sae.safetensors"))
    where = os.path.join(folder, "sae.safetensors")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder}: sparsify activation {cfg['activation']!r} is not "
                         "supported (only topk).")  # fmt: skip
    encoder = np.asarray(raw["encoder.weight"], np.float32)  # [X, D]
    x, d = encoder.shape
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in raw
    if cfg.get("skip_connection", False) != skip:
        raise ValueError(f"{folder}: cfg.json skip_connection disagrees with the weights.")
    if "W_dec" not in raw:
        raise ValueError(f"{where} has no W_dec (an encoder-only checkpoint); it cannot decode.")
    tensors = {
        "W_enc": encoder.T,
        "b_enc": np.asarray(raw["encoder.bias"], np.float32),
        "W_dec": np.asarray(raw["W_dec"], np.float32),
        "b_dec": np.asarray(raw["b_dec"], np.float32),
    }
    fields = dict(
        architecture="topk",
        d_in=d,
        num_latents=x,
        k=int(cfg["k"]),
        subtract_decoder_bias=not transcode,
    )
    if skip and not transcode:
        raise ValueError(
            f"{folder}: a sparsify SAE with a skip connection that subtracts b_dec from its "
            "input is not expressible as an SAEConfig (a skip transcoder reads x as is)."
        )
    if transcode:
        fields.update(d_out=tensors["W_dec"].shape[1], skip_connection=skip)
    if skip:
        tensors["W_skip"] = np.asarray(raw["W_skip"], np.float32)
    return _finish(SAEConfig(**fields), tensors, where)
