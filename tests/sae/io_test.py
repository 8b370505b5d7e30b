"""SAE folders in the SAELens layout: round trips, SAELens parity both ways, clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from interp import sae as sae_lib
from interp.models import sites
from interp.sae import io, modules
from interp.sae.modules import SAE, SAEConfig
from interp.safetensors_io import read as read_safetensors
from interp.safetensors_io import write as write_safetensors
from tests import references

D, X, K = 24, 96, 5
ARCHITECTURES = modules.ARCHITECTURES  # Every registered one.


def _levels(architecture):
    """The settings an architecture needs beyond k (Matryoshka's nested widths)."""
    return {"matryoshka_batchtopk": {"matryoshka_widths": (X // 4, X // 2, X)}}.get(
        architecture, {}
    )


def _params(config, seed=0):
    """Random params at realistic scales: unit decoder rows, encoder ~ 1/sqrt(D)."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(config.num_latents, config.d_in))
    w_dec /= np.linalg.norm(w_dec, axis=-1, keepdims=True)
    params = {
        "W_enc": rng.normal(size=(config.d_in, config.num_latents)) / config.d_in**0.5,
        "b_enc": rng.normal(size=config.num_latents) * 0.1,
        "W_dec": w_dec,
        "b_dec": rng.normal(size=config.d_in) * 0.1,
    }
    if config.arch.has_threshold:
        params["threshold"] = np.abs(rng.normal(size=config.num_latents)) * 0.3
    return {name: value.astype(np.float32) for name, value in params.items()}


def _inputs(config, rows=32, seed=1):
    """Raw activations: about unit size once multiplied by input_scale."""
    x = np.random.default_rng(seed).normal(size=(rows, config.d_in)) / config.input_scale
    return x.astype(np.float32)


def _encode(sae, params, x):
    return np.asarray(sae.apply({"params": params}, x, method="encode"))


def _decode(sae, params, codes):
    return np.asarray(sae.apply({"params": params}, codes, method="decode"))


# --- Our own round trip ---------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("input_scale", [1.0, 0.25])  # Powers of two fold exactly.
def test_round_trip_is_exact(tmp_path, architecture, input_scale):
    config = SAEConfig(
        architecture=architecture, d_in=D, num_latents=X, k=K, input_scale=input_scale,
        subtract_decoder_bias=architecture != "relu", l1_coefficient=3.0, auxk_alpha=0.5,
        **_levels(architecture),
    )  # fmt: skip
    params = _params(config)
    sae_lib.save(tmp_path, config, params, metadata={"hook_name": "blocks_1/resid_post"})
    sae, loaded = sae_lib.load(tmp_path)
    # The site comes back on the config (the folder's metadata names it).
    assert sae.config == config.replace(hook_name="blocks_1/resid_post")
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
    meta = io.read_metadata(tmp_path)
    assert meta["hook_name"] == "blocks_1/resid_post"
    assert meta["transformer_lens_hook_name"] == "blocks.1.hook_resid_post"  # As exported.


def test_round_trip_other_scale_is_close_and_encodes_the_same(tmp_path):
    config = SAEConfig(architecture="topk", d_in=D, num_latents=X, k=K, input_scale=3.7)
    params = _params(config)
    io.save(tmp_path, SAE(config), params)  # A module is accepted too.
    sae, loaded = io.load(tmp_path)
    assert sae.config == config
    for name, value in params.items():
        np.testing.assert_allclose(np.asarray(loaded[name]), value, rtol=1e-6, err_msg=name)
    x = _inputs(config)
    np.testing.assert_allclose(_encode(sae, loaded, x), _encode(SAE(config), params, x), atol=1e-5)


def test_folders_saved_with_the_old_dead_tokens_default_still_load(tmp_path):
    # dead_tokens defaulted to 10M before it scaled with the run (None); exports hold it.
    config = SAEConfig(architecture="topk", d_in=D, num_latents=X, k=K)
    assert config.dead_tokens is None
    io.save(tmp_path, config, _params(config))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg[io.CONFIG_KEY]["dead_tokens"] is None
    cfg[io.CONFIG_KEY]["dead_tokens"] = 10_000_000
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert io.load(tmp_path)[0].config == config.replace(dead_tokens=10_000_000)


def test_folder_layout_follows_sae_lens(tmp_path):
    config = SAEConfig(architecture="batchtopk", d_in=D, num_latents=X, k=K, input_scale=2.0)
    params = _params(config)
    io.save(tmp_path, config, params, metadata={"model_name": "toy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # BatchTopK exports as SAELens does.
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D, X, "none")
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["metadata"]["model_name"] == "toy"
    assert cfg["interp_config"]["input_scale"] == 2.0
    weights = read_safetensors(tmp_path / "sae_weights.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {
        "W_enc": (D, X), "b_enc": (X,), "W_dec": (X, D), "b_dec": (D,), "threshold": (X,),
    }  # fmt: skip
    np.testing.assert_array_equal(weights["W_enc"], params["W_enc"] * 2.0)  # Scale folded in.
    np.testing.assert_array_equal(weights["b_dec"], params["b_dec"] / 2.0)


def test_matryoshka_folders_are_jumprelu_folders_that_record_their_levels(tmp_path):
    widths = (X // 4, X // 2, X)
    config = SAEConfig(architecture="matryoshka_batchtopk", d_in=D, num_latents=X, k=K,
                       matryoshka_widths=widths)  # fmt: skip
    params = _params(config)
    io.save(tmp_path, config, params)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # As SAELens exports a Matryoshka SAE.
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"] == {
        "k": K, "matryoshka_widths": list(widths)
    }  # fmt: skip
    # Read as SAELens writes it (no interp config): the architecture and levels come back.
    del cfg[io.CONFIG_KEY]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae, loaded = io.load(tmp_path)
    assert sae.config.architecture == "matryoshka_batchtopk"
    assert (sae.config.k, sae.config.matryoshka_widths) == (K, widths)
    x = _inputs(config)
    np.testing.assert_allclose(_encode(sae, loaded, x), _encode(SAE(config), params, x), atol=1e-6)
    # Without its levels it is a BatchTopK SAE: the same inference, nothing nested to train.
    del cfg["metadata"]["training_architecture_details"]["matryoshka_widths"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert io.load(tmp_path)[0].config.architecture == "batchtopk"


# --- SAELens folders without SAELens: hand-written configs, NumPy references -----------------


def _write_sae_lens(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "sae_weights.safetensors", tensors)


def _reference_encode(params, x, architecture, k=None, subtract=True):
    pre = (x - params["b_dec"] * subtract) @ params["W_enc"] + params["b_enc"]
    if architecture == "topk":
        keep = np.argsort(-pre, axis=-1)[:, :k]
        mask = np.zeros_like(pre, bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        return np.where(mask, np.maximum(pre, 0), 0)
    if architecture == "jumprelu":
        return np.where(pre > params["threshold"], np.maximum(pre, 0), 0)
    return np.maximum(pre, 0)


@pytest.mark.parametrize(
    "cfg, architecture",
    [
        ({"d_in": D, "d_sae": X, "hook_point": "blocks.0.hook_resid_pre"}, "relu"),
        ({"d_in": D, "d_sae": X, "activation_fn_str": "relu", "sae_lens_version": "3.5"}, "relu"),
        (
            {
                "architecture": "standard", "d_in": D, "d_sae": X, "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
                "normalize_activations": False, "sae_lens_version": "4.1.0",
            },
            "topk",
        ),
        ({"architecture": "jumprelu", "d_in": D, "d_sae": X, "dtype": "torch.float32"}, "jumprelu"),
    ],
)  # fmt: skip
def test_loads_pre_6_sae_lens_configs(tmp_path, cfg, architecture):
    config = SAEConfig(architecture=architecture, d_in=D, num_latents=X, k=K)
    params = _params(config)
    _write_sae_lens(tmp_path, cfg, params)
    sae, loaded = io.load(tmp_path)
    assert sae.config.architecture == architecture
    assert sae.config.subtract_decoder_bias == cfg.get("apply_b_dec_to_input", True)
    x = _inputs(config)
    expected = _reference_encode(params, x, architecture, K, sae.config.subtract_decoder_bias)
    np.testing.assert_allclose(_encode(sae, loaded, x), expected, atol=1e-5)
    if "hook_point" in cfg:  # TransformerLens's name, read as ours.
        assert io.read_metadata(tmp_path)["hook_name"] == "blocks_0/resid_pre"
        assert sae.config.hook_name == "blocks_0/resid_pre"


def test_pre_6_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    config = SAEConfig(architecture="relu", d_in=D, num_latents=X)
    params = _params(config)
    factor = np.linspace(0.5, 2.0, X).astype(np.float32)
    cfg = {"d_in": D, "d_sae": X, "finetuning_scaling_factor": True, "sae_lens_version": "3.0"}
    _write_sae_lens(tmp_path, cfg, {**params, "scaling_factor": factor})
    sae, loaded = io.load(tmp_path)
    codes = _encode(sae, loaded, _inputs(config))
    expected = (codes * factor) @ params["W_dec"] + params["b_dec"]  # Old SAELens decode.
    np.testing.assert_allclose(_decode(sae, loaded, codes), expected, atol=1e-5)


def test_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    config = SAEConfig(architecture="topk", d_in=D, num_latents=X, k=K)
    params = _params(config)
    norms = np.linspace(0.2, 3.0, X).astype(np.float32)
    params["W_dec"] = params["W_dec"] * norms[:, None]
    cfg = {"architecture": "topk", "d_in": D, "d_sae": X, "k": K}
    cfg.update(rescale_acts_by_decoder_norm=True, metadata={"sae_lens_version": "6.5.0"})
    _write_sae_lens(tmp_path, cfg, params)
    sae, loaded = io.load(tmp_path)
    x = _inputs(config)
    # SAELens 6.x TopK: top-k of pre-activations times decoder norms; codes / norms decode.
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    codes = _reference_encode({"W_enc": np.eye(X), "b_enc": 0, "b_dec": 0}, pre * norms, "topk", K)
    np.testing.assert_allclose(_encode(sae, loaded, x), codes, atol=1e-5)
    expected = (codes / norms) @ params["W_dec"] + params["b_dec"]
    np.testing.assert_allclose(_decode(sae, loaded, codes), expected, atol=1e-5)


# --- Errors ---------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(tmp_path / "nope")
    config = SAEConfig(architecture="relu", d_in=D, num_latents=X)
    io.save(tmp_path / "a", config, _params(config))
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing"):
        io.load(tmp_path / "a")
    io.save(tmp_path / "b", config, _params(config))
    (tmp_path / "b" / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        io.load(tmp_path / "b")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"architecture": "gated"}, "gated SAEs are not supported"),
        ({"architecture": "matryoshka_batchtopk"}, "unknown or unsupported SAELens architecture"),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu' is not supported"),
        ({"normalize_activations": "per_row_magic"}, "unknown normalize_activations"),
        ({"architecture": "transcoder"}, "needs an integer 'd_out'"),
        ({"architecture": "topk"}, "needs 'k'"),
        ({"d_sae": X + 1}, r"W_enc has shape \(24, 96\), expected \(24, 97\)"),
    ],
)
def test_unsupported_sae_lens_folders_raise(tmp_path, cfg, message):
    config = SAEConfig(architecture="relu", d_in=D, num_latents=X)
    _write_sae_lens(tmp_path, {"d_in": D, "d_sae": X, **cfg}, _params(config))
    with pytest.raises(ValueError, match=message):
        io.load(tmp_path)


def test_shape_and_name_mismatches_raise(tmp_path):
    config = SAEConfig(architecture="jumprelu", d_in=D, num_latents=X)
    params = _params(config)
    with pytest.raises(ValueError, match="missing"):
        io.save(tmp_path, config, {k: v for k, v in params.items() if k != "threshold"})
    io.save(tmp_path, config, params)
    # Copies: the arrays are memory maps of the file being rewritten.
    weights = {
        k: np.array(v) for k, v in read_safetensors(tmp_path / "sae_weights.safetensors").items()
    }
    write_safetensors(
        tmp_path / "sae_weights.safetensors", {**weights, "b_dec": np.zeros(D + 1, np.float32)}
    )
    with pytest.raises(ValueError, match=r"b_dec has shape \(25,\), expected \(24,\)"):
        io.load(tmp_path)


# --- Parity with SAELens itself -------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_lens():
    hint = "pip install -e '.[test]' torch==2.13.0 (the SAELens reference)"
    references.require_module("torch", hint)
    return references.require_module("sae_lens", hint)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("input_scale, subtract", [(1.0, True), (3.7, True), (0.3, False)])
def test_sae_lens_loads_our_folders(sae_lens, tmp_path, architecture, input_scale, subtract):
    import torch

    config = SAEConfig(
        architecture=architecture, d_in=D, num_latents=X, k=K, input_scale=input_scale,
        subtract_decoder_bias=subtract, **_levels(architecture),
    )  # fmt: skip
    params = _params(config)
    io.save(tmp_path, config, params, metadata={"hook_name": "blocks_0/resid_post"})
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    expected_class = {"relu": "StandardSAE", "topk": "TopKSAE"}.get(architecture, "JumpReLUSAE")
    assert type(theirs).__name__ == expected_class
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"  # TransformerLens's.
    x = _inputs(config, rows=64)
    codes = _encode(SAE(config), params, x)
    assert (codes != 0).sum(-1).mean() > 1  # Something fires.
    with torch.no_grad():
        their_codes = theirs.encode(torch.from_numpy(x)).numpy()
        their_x_hat = theirs.decode(torch.from_numpy(codes.copy())).numpy()
    np.testing.assert_allclose(codes, their_codes, atol=1e-5)
    np.testing.assert_allclose(
        _decode(SAE(config), params, codes), their_x_hat, atol=1e-5, rtol=1e-5
    )


def _randomized(module):
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
            if name == "threshold":
                parameter.abs_()
    return module


def _sae_lens_models(sae_lens):
    """(name, SAELens module, our expected architecture, how to save it)."""
    cfg = dict(d_in=D, d_sae=X)
    batchtopk = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**cfg, k=5.0))
    batchtopk = _randomized(batchtopk)
    batchtopk.topk_threshold.fill_(0.2)
    topk_training = _randomized(
        sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**cfg, k=K))
    )
    return [
        ("standard", _randomized(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**cfg))), "relu"),
        (
            "standard_no_b_dec_in",
            _randomized(
                sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**cfg, apply_b_dec_to_input=False))
            ),
            "relu",
        ),
        ("topk", _randomized(sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**cfg, k=K))), "topk"),
        (
            "topk_rescaled",
            _randomized(
                sae_lens.TopKSAE(
                    sae_lens.TopKSAEConfig(**cfg, k=K, rescale_acts_by_decoder_norm=True)
                )
            ),
            "topk",
        ),
        (
            "jumprelu",
            _randomized(sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**cfg))),
            "jumprelu",
        ),
        ("batchtopk_export", batchtopk, "batchtopk"),
        ("batchtopk_training_checkpoint", batchtopk, "batchtopk"),
        ("topk_training_export", topk_training, "topk"),
        ("topk_training_checkpoint", topk_training, "topk"),
    ]


def test_sae_lens_folders_load_into_ours(sae_lens, tmp_path):
    import torch

    x = torch.from_numpy(_inputs(SAEConfig(d_in=D), rows=64, seed=3))
    for name, module, architecture in _sae_lens_models(sae_lens):
        folder = tmp_path / name
        if name.endswith("_export"):
            module.save_inference_model(folder)
        else:
            module.save_model(folder)
        # The reference is SAELens's inference SAE of the same folder (for training
        # checkpoints: of the inference export, which is what SAELens users encode with).
        reference_folder = folder
        if name.endswith("_checkpoint"):
            reference_folder = tmp_path / f"{name}_reference"
            module.save_inference_model(reference_folder)
        reference = sae_lens.SAE.load_from_disk(reference_folder)
        sae, params = io.load(folder)
        assert sae.config.architecture == architecture, name
        with torch.no_grad():
            their_codes = reference.encode(x).numpy()
        codes = _encode(sae, params, x.numpy())
        assert (codes != 0).sum(-1).mean() > 1, name
        np.testing.assert_allclose(codes, their_codes, atol=1e-5, err_msg=name)
        with torch.no_grad():
            their_x_hat = reference.decode(torch.from_numpy(codes.copy())).numpy()
        np.testing.assert_allclose(
            _decode(sae, params, codes), their_x_hat, atol=1e-5, rtol=1e-5, err_msg=name
        )


def test_pre_6_config_matches_sae_lens(sae_lens, tmp_path):
    import torch

    config = SAEConfig(architecture="topk", d_in=D, num_latents=X, k=K)
    params = _params(config)
    cfg = {
        "architecture": "standard", "d_in": D, "d_sae": X, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "hook_point": "blocks.0.hook_resid_pre",
        "model_name": "gpt2", "dtype": "float32", "device": "cpu", "sae_lens_version": "4.1.0",
        "normalize_activations": "none", "context_size": 128,
    }  # fmt: skip
    _write_sae_lens(tmp_path, cfg, params)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    sae, loaded = io.load(tmp_path)
    x = _inputs(config, rows=64)
    with torch.no_grad():
        their_codes = theirs.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_encode(sae, loaded, x), their_codes, atol=1e-5)


def test_gcs_round_trip(gcs_bucket):
    config = SAEConfig(architecture="jumprelu", d_in=D, num_latents=X, input_scale=0.5)
    params = _params(config)
    path = f"{gcs_bucket}/saes/layer_1"
    io.save(path, config, params, metadata={"hook_name": "blocks_1/resid_post"})
    sae, loaded = io.load(path)
    assert sae.config == config.replace(hook_name="blocks_1/resid_post")
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(f"{gcs_bucket}/saes/missing")


# --- SAELens variants: per-token normalisation, hook_z, per-head, transcoders ----------------


def _sae_lens_variants(sae_lens):
    """(name, SAELens module, metadata) for the variants `load` reads since issue 10."""
    cfg = dict(d_in=D, d_sae=X)
    transcoder = dict(d_in=D, d_sae=X, d_out=D + 8, apply_b_dec_to_input=False)
    return [
        ("layer_norm", sae_lens.StandardSAE(
            sae_lens.StandardSAEConfig(**cfg, normalize_activations="layer_norm")), {}),
        ("constant_norm_rescale", sae_lens.TopKSAE(
            sae_lens.TopKSAEConfig(**cfg, k=K, normalize_activations="constant_norm_rescale")),
         {}),
        ("transcoder", sae_lens.Transcoder(sae_lens.TranscoderConfig(**transcoder)),
         {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}),
        ("skip_transcoder", sae_lens.SkipTranscoder(sae_lens.SkipTranscoderConfig(**transcoder)),
         {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out"}),
        ("jumprelu_transcoder", sae_lens.JumpReLUTranscoder(
            sae_lens.JumpReLUTranscoderConfig(**transcoder)),
         {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out"}),
    ]  # fmt: skip


def test_sae_lens_variants_load_and_run_as_sae_lens_does(sae_lens, tmp_path):
    import torch

    x = torch.from_numpy(_inputs(SAEConfig(d_in=D), rows=64, seed=5) * 3.0 + 0.5)
    for name, module, metadata in _sae_lens_variants(sae_lens):
        module = _randomized(module)
        for key, value in metadata.items():
            module.cfg.metadata[key] = value
        module.save_model(tmp_path / name)
        reference = sae_lens.SAE.load_from_disk(tmp_path / name)
        sae, params = io.load(tmp_path / name)
        with torch.no_grad():
            their_codes = reference.encode(x).numpy()
            their_out = reference(x).numpy()
        out, codes = (np.asarray(v) for v in sae.apply({"params": params}, x.numpy()))
        assert (codes != 0).sum(-1).mean() > 1, name
        np.testing.assert_allclose(codes, their_codes, atol=1e-4, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(out, their_out, atol=1e-4, rtol=1e-5, err_msg=name)
        if "transcoder" in name:
            assert sae.config.is_transcoder and sae.config.output_width == D + 8
            assert sae.config.output_hook_name == "blocks_1/mlp/out", name
            assert sae.config.skip_connection == name.startswith("skip"), name
        else:
            assert sae.config.normalize_activations == name
            with pytest.raises(ValueError, match="needs its input"):
                sae.apply({"params": params}, codes, method="decode")
        # Written back out, SAELens reads the same SAE.
        io.save(tmp_path / f"{name}_again", sae.config, params)
        again = sae_lens.SAE.load_from_disk(tmp_path / f"{name}_again")
        with torch.no_grad():
            np.testing.assert_allclose(again(x).numpy(), their_out, atol=1e-4, err_msg=name)
    assert io.read_metadata(tmp_path / "transcoder")["hook_name"] == "blocks_1/ln_2/normalized"
    # hook_mlp_in is resid_mid or resid_pre by model: kept as written, resolved with the model.
    assert io.read_metadata(tmp_path / "skip_transcoder")["hook_name"] == "blocks.1.hook_mlp_in"


def test_hook_z_and_per_head_folders_read_the_rows_of_their_site(sae_lens, tmp_path):
    import torch

    heads, head_dim = 4, D // 4
    module = _randomized(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
        d_in=D, d_sae=X, reshape_activations="hook_z")))  # fmt: skip
    module.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    module.save_model(tmp_path / "z")
    reference = sae_lens.SAE.load_from_disk(tmp_path / "z")
    sae, params = io.load(tmp_path / "z")
    assert sae.config.hook_name == "blocks_0/attn/z"
    # SAELens reads hook_z values [..., heads, head_dim]; ours the site's rows (heads side by
    # side, `sites.to_rows`), the same numbers.
    z = np.random.default_rng(0).normal(size=(2, 5, heads, head_dim)).astype(np.float32)
    rows = np.asarray(sites.to_rows("blocks_0/attn/z", jnp.asarray(z)))
    with torch.no_grad():
        their_codes = reference.encode(torch.from_numpy(z)).numpy()
        their_z_hat = reference(torch.from_numpy(z)).numpy()  # [..., heads, head_dim]
    np.testing.assert_allclose(_encode(sae, params, rows), their_codes, atol=1e-5)
    z_hat = sites.from_rows("blocks_0/attn/z", z, sae.apply({"params": params}, rows)[0])
    np.testing.assert_allclose(z_hat, their_z_hat, atol=1e-5)
    # Written back out it is still a hook_z SAE to SAELens: it takes [..., N, H] values.
    io.save(tmp_path / "z_again", sae.config, params)
    again = sae_lens.SAE.load_from_disk(tmp_path / "z_again")
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(z)).numpy(), their_z_hat, atol=1e-5)

    head = _randomized(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=head_dim, d_sae=X)))
    head.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    head.cfg.metadata.hook_head_index = 2
    head.save_model(tmp_path / "head")
    sae, params = io.load(tmp_path / "head")
    assert (sae.config.hook_name, sae.config.hook_head_index) == ("blocks_0/attn/z", 2)
    io.save(tmp_path / "head_again", sae.config, params)
    assert io.read_metadata(tmp_path / "head_again")["hook_head_index"] == 2
    written = json.loads((tmp_path / "head_again" / "cfg.json").read_text())
    assert written["reshape_activations"] == "none"  # One head's rows need no reshaping.
    # Before SAELens 6.0 the head index was hook_point_head_index.
    cfg = {"d_in": head_dim, "d_sae": X, "hook_point": "blocks.0.attn.hook_z",
           "hook_point_head_index": 1, "sae_lens_version": "4.1.0"}  # fmt: skip
    _write_sae_lens(tmp_path / "old_head", cfg, {k: np.asarray(v) for k, v in params.items()})
    assert io.load(tmp_path / "old_head")[0].config.hook_head_index == 1
    # attn/q is hook_rot_q or hook_q in TransformerLens by model: exported as ours.
    io.save(tmp_path / "q", sae.config.replace(hook_name="blocks_0/attn/q"), params)
    assert io.read_metadata(tmp_path / "q")["hook_name"] == "blocks_0/attn/q"
