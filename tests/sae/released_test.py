"""Released SAEs by name and hf:// folders, from a Hugging Face cache populated the way
huggingface_hub lays it out (the suite runs offline): each native format converted exactly,
checked against SAELens's own loader (Gemma Scope) and a hand computation of the format's
forward pass (Gemma Scope's JumpReLU, sparsify's TopK and skip transcoder)."""

import json

import jax
import numpy as np
import pytest
from huggingface_hub import constants

from interp import sae as saes
from interp import safetensors_io
from interp.sae import io
from interp.sae.modules import SAEConfig, init_params
from tests import references

COMMIT = "c" * 40
D, X = 16, 48
GEMMA_ID = "layer_3/width_16k/average_l0_50"


def _put(cache, repo_id, files):
    """Writes {path in repo: writer(path)} into the cache's snapshot of repo_id at COMMIT."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, write in files.items():
        path = repo / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _gemma_scope_params(rng):
    return {
        "W_enc": rng.normal(0, 0.3, (D, X)).astype(np.float32),
        "W_dec": rng.normal(0, 0.3, (X, D)).astype(np.float32),
        "b_enc": rng.normal(0, 0.1, (X,)).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, (D,)).astype(np.float32),
        "threshold": np.abs(rng.normal(0, 0.3, (X,))).astype(np.float32),
    }


def _sparsify_params(rng, *, skip=False):
    out = {
        "encoder.weight": rng.normal(0, 0.3, (X, D)).astype(np.float32),
        "encoder.bias": rng.normal(0, 0.1, (X,)).astype(np.float32),
        "W_dec": rng.normal(0, 0.3, (X, D)).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, (D,)).astype(np.float32),
    }
    if skip:
        out["W_skip"] = rng.normal(0, 0.3, (D, D)).astype(np.float32)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "hub"
    gemma = _gemma_scope_params(rng)
    _put(
        root,
        "google/gemma-scope-2b-pt-res",
        {f"{GEMMA_ID}/params.npz": lambda p: np.savez(p, **gemma)},
    )
    sparsify = _sparsify_params(rng)
    transcoder = _sparsify_params(rng, skip=True)
    cfg = {"activation": "topk", "k": 5, "num_latents": X, "normalize_decoder": True}
    _put(
        root,
        "EleutherAI/sae-llama-3-8b-32x",
        {
            "layers.7/cfg.json": lambda p: p.write_text(json.dumps(dict(cfg, d_in=D))),
            "layers.7/sae.safetensors": lambda p: safetensors_io.write(p, sparsify),
            "layers.8.mlp/cfg.json": lambda p: p.write_text(
                json.dumps(dict(cfg, d_in=D, transcode=True, skip_connection=True))
            ),
            "layers.8.mlp/sae.safetensors": lambda p: safetensors_io.write(p, transcoder),
        },
    )
    ours = SAEConfig(architecture="topk", d_in=D, num_latents=X, k=4)
    params = init_params(ours, jax.random.PRNGKey(0))
    _put(root, "someone/saes", {})
    folder = root / "models--someone--saes" / "snapshots" / COMMIT / "deep" / "folder"
    io.save(folder, ours, params, metadata={"hook_name": "blocks.2.hook_resid_post"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return {"gemma": gemma, "sparsify": sparsify, "transcoder": transcoder, "ours": params}


def _apply(sae, params, x, method):
    return np.asarray(sae.apply({"params": params}, x, method=method))


def test_gemma_scope_by_name_is_a_jumprelu_at_its_site(cache):
    sae, params = saes.load_pretrained("gemma-scope-2b-pt-res", GEMMA_ID)
    assert sae.config.hook_name == "blocks_3/resid_post"
    assert (sae.config.architecture, sae.config.subtract_decoder_bias) == ("jumprelu", False)
    p = cache["gemma"]
    x = np.random.default_rng(1).normal(0, 1, (7, D)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope encodes x itself, not x - b_dec.
    want = np.where(pre > p["threshold"], pre, 0.0)
    codes = _apply(sae, params, x, "encode")
    np.testing.assert_allclose(codes, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _apply(sae, params, codes, "decode"), want @ p["W_dec"] + p["b_dec"], atol=1e-5
    )
    assert (want > 0).any() and (want == 0).any()


def test_gemma_scope_conversion_equals_sae_lens_loader(cache):
    loaders = references.require_module(
        "sae_lens.loading.pretrained_sae_loaders", "pip install -e '.[test]' torch==2.13.0"
    )
    cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
        "google/gemma-scope-2b-pt-res", GEMMA_ID, cfg_overrides={"d_in": D, "d_sae": X}
    )
    _, params = saes.load(f"hf://google/gemma-scope-2b-pt-res/{GEMMA_ID}")
    assert sorted(state) == sorted(params)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(params[name]), value.numpy())
    assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] == "jumprelu"


def _sparsify_forward(p, x, k, transcode=False):
    """sparsify's SparseCoder.encode / decode (sparse_coder.py) in NumPy."""
    inp = x if transcode else x - p["b_dec"]
    pre = np.maximum(inp @ p["encoder.weight"].T + p["encoder.bias"], 0.0)
    top = np.argsort(-pre, axis=-1)[:, :k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.take_along_axis(pre, top, -1), -1)
    out = codes @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        out = out + x @ p["W_skip"].T
    return codes, out


def test_sparsify_sae_and_skip_transcoder_by_name(cache):
    x = np.random.default_rng(2).normal(0, 1, (6, D)).astype(np.float32)
    sae, params = saes.load_pretrained("sparsify-llama-3-8b-32x", "layers.7")
    assert sae.config.hook_name == "blocks_7/resid_post" and sae.config.k == 5
    want_codes, want_out = _sparsify_forward(cache["sparsify"], x, 5)
    codes = _apply(sae, params, x, "encode")
    np.testing.assert_allclose(codes, want_codes, atol=1e-5)
    np.testing.assert_allclose(_apply(sae, params, codes, "decode"), want_out, atol=1e-5)
    # A skip transcoder (not in the registry): hf:// reads any folder of a known format.
    sae, params = saes.load("hf://EleutherAI/sae-llama-3-8b-32x/layers.8.mlp")
    assert sae.config.skip_connection and not sae.config.subtract_decoder_bias
    want_codes, want_out = _sparsify_forward(cache["transcoder"], x, 5, transcode=True)
    codes = _apply(sae, params, x, "encode")
    np.testing.assert_allclose(codes, want_codes, atol=1e-5)
    out = np.asarray(sae.apply({"params": params}, codes, x, method="decode"))
    np.testing.assert_allclose(out, want_out, atol=1e-5)


def test_an_hf_folder_of_a_registered_release_gets_its_site(cache):
    sae, _ = saes.load(f"hf://google/gemma-scope-2b-pt-res/{GEMMA_ID}")
    assert sae.config.hook_name == "blocks_3/resid_post"
    sae, _ = saes.load("hf://EleutherAI/sae-llama-3-8b-32x/layers.7")
    assert sae.config.hook_name == "blocks_7/resid_post"
    sae, _ = saes.load("hf://EleutherAI/sae-llama-3-8b-32x/layers.8.mlp")  # Not a release's.
    assert sae.config.hook_name is None


def test_a_saelens_folder_on_the_hub_loads_as_from_disk(cache):
    sae, params = saes.load("hf://someone/saes/deep/folder")
    for name, value in cache["ours"].items():
        np.testing.assert_allclose(np.asarray(params[name]), np.asarray(value), atol=1e-7)
    assert sae.config.k == 4


def test_names_not_in_the_registry_list_the_nearest(cache):
    with pytest.raises(KeyError, match="nearest.*gemma-scope-2b-pt-res"):
        saes.load_pretrained("gemma-scope-2b-pt-re", GEMMA_ID)
    with pytest.raises(KeyError, match=r"its ids match the pattern layer_\(\?P<layer>"):
        saes.load_pretrained("gemma-scope-2b-pt-res", "layer_3/width_16k/canonical")
    with pytest.raises(FileNotFoundError, match="has no folder 'layer_4/.*check the SAE id"):
        saes.load_pretrained("gemma-scope-2b-pt-res", "layer_4/width_16k/average_l0_50")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        saes.load("hf://nobody/nothing/here")
    with pytest.raises(ValueError, match="names a whole repository; name the SAE's folder"):
        saes.load("hf://someone/saes")


def _jumprelu(x, w_enc, b_enc, threshold):
    pre = x @ w_enc + b_enc
    return np.where(pre > threshold, pre, 0.0)


@pytest.fixture
def more(tmp_path, monkeypatch):
    """Gemma Scope 2 (an SAE and an affine transcoder) and Llama Scope folders in the cache."""
    rng = np.random.default_rng(3)
    root = tmp_path / "hub2"
    sae = {k.replace("W_", "w_"): v for k, v in _gemma_scope_params(rng).items()}
    transcoder = {k.replace("W_", "w_"): v for k, v in _gemma_scope_params(rng).items()}
    transcoder["affine_skip_connection"] = rng.normal(0, 0.3, (D, D)).astype(np.float32)
    _put(
        root,
        "google/gemma-scope-2-270m-pt",
        {
            "resid_post/layer_5_width_16k_l0_small/params.safetensors": lambda p: (
                safetensors_io.write(p, sae)
            ),
            "transcoder/layer_5_width_16k_l0_big_affine/params.safetensors": lambda p: (
                safetensors_io.write(p, transcoder)
            ),
        },
    )
    llama = {
        "encoder.weight": rng.normal(0, 0.3, (X, D)).astype(np.float32),
        "encoder.bias": rng.normal(0, 0.1, (X,)).astype(np.float32),
        "decoder.weight": rng.normal(0, 0.3, (D, X)).astype(np.float32),
        "decoder.bias": rng.normal(0, 0.1, (D,)).astype(np.float32),
    }
    hyper = {
        "d_model": D,
        "d_sae": X,
        "jump_relu_threshold": 0.2,
        "dataset_average_activation_norm": {"in": 9.0, "out": 9.0},
        "norm_activation": "dataset-wise",
        "act_fn": "jumprelu",
        "hook_point_in": "blocks.6.hook_resid_post",
        "hook_point_out": "blocks.6.hook_resid_post",
    }
    name = "Llama3_1-8B-Base-L6R-8x"
    _put(
        root,
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        {
            f"{name}/hyperparams.json": lambda p: p.write_text(json.dumps(hyper)),
            f"{name}/checkpoints/final.safetensors": lambda p: safetensors_io.write(p, llama),
        },
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return {"sae": sae, "transcoder": transcoder, "llama": llama, "hyper": hyper}


def test_gemma_scope_2_sae_and_affine_transcoder(more):
    x = np.random.default_rng(4).normal(0, 1, (5, D)).astype(np.float32)
    sae, params = saes.load_pretrained("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_small")
    assert sae.config.hook_name == "blocks_5/resid_post"
    p = more["sae"]
    want = _jumprelu(x, p["w_enc"], p["b_enc"], p["threshold"])
    codes = _apply(sae, params, x, "encode")
    np.testing.assert_allclose(codes, want, atol=1e-5)
    np.testing.assert_allclose(
        _apply(sae, params, codes, "decode"), want @ p["w_dec"] + p["b_dec"], atol=1e-5
    )
    sae, params = saes.load_pretrained(
        "gemma-scope-2-270m-pt-transcoders", "transcoder/layer_5_width_16k_l0_big_affine"
    )
    c = sae.config
    assert (c.hook_name, c.output_hook_name, c.skip_connection) == (
        "blocks_5/mlp/in",
        "blocks_5/mlp/out",
        True,
    )
    p = more["transcoder"]
    want = _jumprelu(x, p["w_enc"], p["b_enc"], p["threshold"])
    out = np.asarray(sae.apply({"params": params}, want, x, method="decode"))
    # The skip is stored [D_in, D_out] and applied as x @ affine_skip_connection.
    want_out = want @ p["w_dec"] + p["b_dec"] + x @ p["affine_skip_connection"]
    np.testing.assert_allclose(out, want_out, atol=1e-5)


def test_llama_scope_equals_sae_lens_conversion(more):
    loaders = references.require_module(
        "sae_lens.loading.pretrained_sae_loaders", "pip install -e '.[test]' torch==2.13.0"
    )
    sae, params = saes.load_pretrained("llama_scope_lxr_8x", "l6r_8x")
    assert sae.config.hook_name == "blocks_6/resid_post"
    cfg, state, _ = loaders.llama_scope_sae_huggingface_loader(
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        "Llama3_1-8B-Base-L6R-8x",
        cfg_overrides={"dtype": "float32"},
    )
    assert cfg["normalize_activations"] == "expected_average_only_in"
    # SAELens folds the input scale into the weights (fold_activation_norm_scaling_factor).
    s = D**0.5 / more["hyper"]["dataset_average_activation_norm"]["in"]
    w = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    x = np.random.default_rng(5).normal(0, 3, (9, D))
    pre = x @ (w["W_enc"] * s) + w["b_enc"]
    want = np.where(pre > w["threshold"], pre, 0.0)
    codes = _apply(sae, params, x.astype(np.float32), "encode")
    np.testing.assert_allclose(codes, want, rtol=1e-4, atol=1e-4)
    assert (want > 0).any() and (want == 0).any()
    recon = np.asarray(sae.apply({"params": params}, codes, method="decode"))
    np.testing.assert_allclose(recon, want @ (w["W_dec"] / s) + w["b_dec"] / s, atol=1e-4)
