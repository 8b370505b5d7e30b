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
- **gemma_scope_2**: Gemma Scope 2's `params.safetensors` (w_enc, w_dec, b_enc, b_dec,
  threshold; a transcoder's affine_skip_connection [D, O]): the same JumpReLU (SAELens's
  `gemma_3` conversion).
- **llama_scope**: Llama Scope's `hyperparams.json` + `checkpoints/final.safetensors`: a
  JumpReLU with one threshold, inputs scaled by sqrt(D) / the dataset's average norm (He et
  al. 2024, "Llama Scope", arXiv:2410.20526; SAELens's `llama_scope` conversion).
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


class UnknownSAEError(KeyError):
    """A release or SAE id not in the registry; the message lists what is."""

    def __str__(self) -> str:  # KeyError's repr() of the message doubles its backslashes.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Release:
    """A released suite of SAEs in one Hub repository.

    Attributes:
      repo_id: The Hub repository.
      model: The model the SAEs read (a Hub id).
      id_pattern: Regex an SAE id must match in full; its named groups fill `folder` and `site`.
      folder: The id's folder in the repository (format string over the groups).
      site: The id's site in interp's vocabulary (format string over the groups).
      format: 'saelens', 'gemma_scope', 'gemma_scope_2', 'llama_scope' or 'sparsify'.
      source: Where these facts come from.
      output_site: A transcoder's output site (format string); None for an SAE.
    """

    repo_id: str
    model: str
    id_pattern: str
    folder: str
    site: str
    format: str
    source: str
    output_site: str | None = None


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


def _gemma_scope_2(size: str, tuned: str, kind: str) -> Release:
    """Gemma Scope 2 (Gemma 3): one repository per model, a folder per site kind."""
    repo = f"google/gemma-scope-2-{size}-{tuned}"
    model = f"google/gemma-3-{size}" + ("" if size == "270m" and tuned == "pt" else f"-{tuned}")
    ids = (
        r"layer_(?P<layer>\d+)_width_(?P<width>\d+[km])_l0_(?P<l0>big|medium|small)"
        r"(?P<seed>_seed_\d+)?"
    )
    source = f"https://huggingface.co/{repo} (SAELens pretrained_saes.yaml, conversion gemma_3)"
    if kind == "transcoders":
        return Release(
            repo_id=repo,
            model=model,
            id_pattern=r"transcoder/" + ids + r"(?P<affine>_affine)?",
            folder="transcoder/layer_{layer}_width_{width}_l0_{l0}{seed}{affine}",
            site="blocks_{layer}/mlp/in",  # pre_feedforward_layernorm's output
            output_site="blocks_{layer}/mlp/out",  # post_feedforward_layernorm's output
            format="gemma_scope_2",
            source=source,
        )
    folder, site = {
        "res": ("resid_post", "resid_post"),
        "mlp": ("mlp_out", "mlp/out"),  # post_feedforward_layernorm's output
        "att": ("attn_out", "attn/z"),  # o_proj's input: the heads side by side
    }[kind]
    return Release(
        repo_id=repo,
        model=model,
        id_pattern=ids,
        folder=folder + "/layer_{layer}_width_{width}_l0_{l0}{seed}",
        site="blocks_{layer}/" + site,
        format="gemma_scope_2",
        source=source,
    )


def _llama_scope(kind: str, factor: str) -> Release:
    """Llama Scope (He et al. 2024, arXiv:2410.20526): Llama-3.1-8B, one repository per site
    kind and width."""
    letter = kind.upper()
    repo = f"fnlp/Llama3_1-8B-Base-LX{letter}-{factor}"
    return Release(
        repo_id=repo,
        model="meta-llama/Llama-3.1-8B",
        id_pattern=r"l(?P<layer>\d+)" + kind + "_" + factor,
        folder="Llama3_1-8B-Base-L{layer}" + letter + "-" + factor,
        site="blocks_{layer}/" + {"r": "resid_post", "a": "attn_out", "m": "mlp/out"}[kind],
        format="llama_scope",
        source=f"https://huggingface.co/{repo} (SAELens pretrained_saes.yaml, conversion "
        "llama_scope)",
    )


RELEASES: dict[str, Release] = {
    **{
        f"gemma-scope-2-{size}-{tuned}-{kind}": _gemma_scope_2(size, tuned, kind)
        for size in ("270m", "1b", "4b", "12b", "27b")
        for tuned in ("pt", "it")
        for kind in ("res", "mlp", "att", "transcoders")
        # 27B pretrained: residual SAEs only (SAELens 6.54 lists no others).
        if not (size == "27b" and tuned == "pt" and kind != "res")
    },
    **{
        f"llama_scope_lx{kind}_{factor}": _llama_scope(kind, factor)
        for kind in ("r", "a", "m")
        for factor in ("8x", "32x")
    },
    "gemma-scope-2b-pt-transcoders": Release(
        repo_id="google/gemma-scope-2b-pt-transcoders",
        model="google/gemma-2-2b",
        id_pattern=r"layer_(?P<layer>\d+)/width_(?P<width>\d+[km])/average_l0_(?P<l0>\d+)",
        folder="layer_{layer}/width_{width}/average_l0_{l0}",
        site="blocks_{layer}/ln_2/normalized",  # SAELens: blocks.L.ln2.hook_normalized
        output_site="blocks_{layer}/mlp/out",
        format="gemma_scope",
        source="https://huggingface.co/google/gemma-scope-2b-pt-transcoders (SAELens "
        "pretrained_saes.yaml, conversion gemma_2_transcoder)",
    ),
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
        id_pattern=r"blocks\.(?P<layer>\d+)\.hook_resid_(?P<where>pre|post)",
        folder="blocks.{layer}.hook_resid_{where}",
        site="blocks_{layer}/resid_{where}",
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
      UnknownSAEError (a KeyError): a release or id that is not in the registry, with the
        nearest names.
      FileNotFoundError / PermissionError: as `interp.models.hub.resolve`.
    """
    if release not in RELEASES:
        near = difflib.get_close_matches(release, RELEASES, n=5, cutoff=0.3)
        raise UnknownSAEError(
            f"No release {release!r}; nearest: {near or sorted(RELEASES)} (all: "
            "interp.sae.released.RELEASES; an SAE folder on the Hub that is not listed loads "
            "with interp.sae.load('hf://org/repo/path'))."
        )
    entry = RELEASES[release]
    match = re.fullmatch(entry.id_pattern, sae_id)
    if match is None:
        raise UnknownSAEError(
            f"{sae_id!r} is not an SAE id of {release}: its ids match the pattern "
            f"{entry.id_pattern} (folders {entry.folder} of {entry.repo_id})."
        )
    groups = {k: v or "" for k, v in match.groupdict().items()}
    folder = _fetch(entry.repo_id, entry.folder.format(**groups), revision)
    sae, params = load_folder(folder, entry.format)
    out = entry.output_site.format(**groups) if entry.output_site else None
    return _at_site(sae, entry.site.format(**groups), out), params


def load_hf(url: str, *, revision: str | None = None) -> tuple[SAE, dict[str, Any]]:
    """Loads `hf://org/repo/path/in/repo` (an SAE folder inside a Hub repository), of any
    format `load_folder` reads."""
    parts = url.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not url.startswith(HF_PREFIX):
        raise ValueError(f"{url!r} is not hf://org/repo[/path/in/repo].")
    repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
    sae, params = load_folder(_fetch(repo_id, path, revision))
    known = _site_of(repo_id, path)
    if known is not None and sae.config.hook_name is None:
        sae = _at_site(sae, *known)
    return sae, params


def _site_of(repo_id: str, path: str) -> tuple[str, str | None] | None:
    """(site, output site) of a folder of a release in the registry; None if none matches."""
    for entry in RELEASES.values():
        if entry.repo_id != repo_id:
            continue
        match = re.fullmatch(_folder_pattern(entry), path)
        if match:
            groups = match.groupdict()
            out = entry.output_site.format(**groups) if entry.output_site else None
            return entry.site.format(**groups), out
    return None


def _folder_pattern(entry: Release) -> str:
    """A regex of the release's folders: its folder template with each {group} replaced by
    that group's pattern in the id pattern (optional where the id's group is)."""
    groups = {
        name: (body, bool(optional))
        for name, body, optional in re.findall(r"\(\?P<(\w+)>([^()]*)\)(\?)?", entry.id_pattern)
    }
    out, at = [], 0
    for field in re.finditer(r"\{(\w+)\}", entry.folder):
        out.append(re.escape(entry.folder[at : field.start()]))
        body, optional = groups[field.group(1)]
        out.append(f"(?P<{field.group(1)}>{body})" + ("?" if optional else ""))
        at = field.end()
    out.append(re.escape(entry.folder[at:]))
    return "".join(out)


def _at_site(sae: SAE, site: str, output_site: str | None) -> SAE:
    changes: dict[str, Any] = {"hook_name": site}
    if output_site is not None:  # A transcoder: it reads its input as it is.
        changes.update(
            output_hook_name=output_site,
            d_out=sae.config.output_width,
            subtract_decoder_bias=False,
        )
    return SAE(sae.config.replace(**changes))


def _fetch(repo_id: str, path: str, revision: str | None) -> str:
    """The local folder of `path` in the repository (only its files fetched)."""
    from interp.models import hub  # noqa: PLC0415

    if not path:
        raise ValueError(
            f"hf://{repo_id} names a whole repository; name the SAE's folder in it "
            f"(hf://{repo_id}/path/to/folder)."
        )
    # The files of the formats `load_folder` reads, in this folder only (a parent folder's
    # pattern would fetch every SAE below it).
    snapshot = hub.snapshot(
        repo_id, revision, allow_patterns=[f"{path}/{name}" for name in _SAE_FILES]
    )
    folder = os.path.join(snapshot, path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{repo_id}@{revision or 'main'} has no folder {path!r} (or it is not in the cache "
            "in offline mode); check the SAE id."
        )
    return folder


_SAE_FILES = (
    "cfg.json",
    io.WEIGHTS_FILE,
    "params.npz",
    "params.safetensors",
    "config.json",
    "hyperparams.json",
    "checkpoints/final.safetensors",
    "sae.safetensors",
)


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
    if "params.safetensors" in names:
        return "gemma_scope_2"
    if "hyperparams.json" in names:
        return "llama_scope"
    if {"cfg.json", "sae.safetensors"} <= names:
        return "sparsify"
    raise ValueError(
        f"{folder} is not an SAE folder of a known format (files {sorted(names)[:10]}); "
        "expected cfg.json + sae_weights.safetensors (SAELens), params.npz (Gemma Scope), "
        "params.safetensors (Gemma Scope 2), hyperparams.json + checkpoints/final.safetensors "
        "(Llama Scope) or cfg.json + sae.safetensors (sparsify)."
    )


def load_folder(folder: str, format: str | None = None) -> tuple[SAE, dict[str, Any]]:  # noqa: A002
    """Loads a local SAE folder of any supported format (detected when None)."""
    format = format or detect_format(folder)  # noqa: A001
    if format == "saelens":
        return io.load(folder)
    if format == "gemma_scope":
        return _gemma_scope_folder(folder)
    if format == "gemma_scope_2":
        return _gemma_scope_2_folder(folder)
    if format == "llama_scope":
        return _llama_scope_folder(folder)
    if format == "sparsify":
        return _sparsify_folder(folder)
    raise ValueError(
        f"Unknown SAE format {format!r}; known: saelens, gemma_scope, gemma_scope_2, "
        "llama_scope, sparsify."
    )


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


def _gemma_scope_2_folder(folder: str):
    """Gemma Scope 2's params.safetensors (w_enc [D, X], w_dec [X, O], b_enc, b_dec, threshold,
    a transcoder's affine_skip_connection [D, O]): JumpReLU, b_dec not subtracted."""
    path = os.path.join(folder, "params.safetensors")
    raw = {k: np.asarray(v, np.float32) for k, v in safetensors_io.read(path).items()}
    names = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
    if not names <= set(raw):
        raise ValueError(f"{path} holds {sorted(raw)}; Gemma Scope 2's are {sorted(names)}.")
    tensors = {("W" + k[1:] if k.startswith("w_") else k): raw[k] for k in names}
    d, x = tensors["W_enc"].shape
    out = tensors["W_dec"].shape[1]
    fields: dict[str, Any] = dict(
        architecture="jumprelu", d_in=d, num_latents=x, subtract_decoder_bias=False
    )
    if "affine_skip_connection" in raw:  # Stored [D, O]; ours is [O, D].
        tensors["W_skip"] = raw["affine_skip_connection"].T
        fields.update(d_out=out, skip_connection=True)
    elif out != d:
        fields.update(d_out=out)
    return _finish(SAEConfig(**fields), tensors, path)


def _llama_scope_folder(folder: str):
    """Llama Scope: hyperparams.json + checkpoints/final.safetensors (encoder/decoder as torch
    Linear layers). Inputs are scaled by sqrt(D) / the dataset's average activation norm before
    encoding and reconstructions unscaled after (`SAEConfig.input_scale`); one JumpReLU
    threshold for every latent; b_dec not subtracted."""
    hyper = json.loads(open(os.path.join(folder, "hyperparams.json")).read())
    path = os.path.join(folder, "checkpoints", "final.safetensors")
    raw = {k: np.asarray(v, np.float32) for k, v in safetensors_io.read(path).items()}
    d, x = int(hyper["d_model"]), int(hyper["d_sae"])
    norm = (hyper.get("dataset_average_activation_norm") or {}).get("in")
    if hyper.get("norm_activation", "dataset-wise") != "dataset-wise" or not norm:
        raise ValueError(
            f"{folder}: norm_activation {hyper.get('norm_activation')!r} with average norm "
            f"{norm!r}; Llama Scope's released SAEs normalise dataset-wise."
        )
    if hyper.get("act_fn", "jumprelu") != "jumprelu":
        raise ValueError(f"{folder}: act_fn {hyper['act_fn']!r}; Llama Scope's is jumprelu.")
    scale = float(d**0.5 / norm)
    tensors = {
        "W_enc": raw["encoder.weight"].T,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["decoder.weight"].T,
        "b_dec": raw["decoder.bias"],
        # As SAELens's conversion: the file's threshold times the input scale (it is stated
        # for unscaled pre-activations).
        "threshold": np.full((x,), float(hyper["jump_relu_threshold"]) * scale, np.float32),
    }
    config = SAEConfig(
        architecture="jumprelu",
        d_in=d,
        num_latents=x,
        subtract_decoder_bias=False,
        input_scale=scale,
    )
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
