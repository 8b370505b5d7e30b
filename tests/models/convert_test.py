"""Parity with transformers: the contract of `interp.models.convert`.

Each family is a tiny random-weight HF model (fp32, eager attention) saved with
`save_pretrained`, loaded with our `from_pretrained`, and compared on logits: max |ours - hf| /
max |hf| <= 1e-4 over real (unpadded) positions.
"""

import functools
import importlib.util
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from interp import models
from interp.models import convert, pretrained
from interp.models.config import ModelConfig

VOCAB, BATCH, LENGTH, PAD = 128, 2, 16, 5
TOLERANCE = 1e-4


def _hf_config(variant):
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


VARIANTS = ["gpt2", "neox_parallel", "neox_sequential", "llama_gqa_llama3"]
VARIANTS += ["llama_mha_bias_tied", "gemma2"]


def _randomize(model, seed=0):
    """Weights of std 0.1 (norm gains 1 + 0.1 noise) so attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    offset = 0.0 if model.config.model_type == "gemma2" else 1.0  # Gemma norms are (1 + w).
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn(param.shape, generator=generator)
            # 1-D weights are norm gains (linear and embedding weights are 2-D).
            gain = param.ndim == 1 and name.endswith("weight")
            param.copy_(noise + offset if gain else noise)
    return model


def _hf_model(variant, dtype=torch.float32):
    torch.manual_seed(0)
    config = _hf_config(variant)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return _randomize(model).to(dtype).eval()


_CHECKPOINTS = tempfile.TemporaryDirectory(prefix="convert_test_")  # removed at exit


@functools.cache
def _converted(variant):
    """(variant, HF model, its folder, our model, our params), built once per process."""
    hf = _hf_model(variant)
    folder = pathlib.Path(_CHECKPOINTS.name) / variant
    hf.save_pretrained(folder, safe_serialization=True)
    model, params, _ = models.from_pretrained(folder)
    return variant, hf, folder, model, params


@pytest.fixture(params=VARIANTS)
def converted(request):
    return _converted(request.param)


@functools.cache
def _jitted(model):
    return jax.jit(model.apply)


def _ours(model, params, tokens, mask=None):
    mask = np.ones(tokens.shape, np.int32) if mask is None else mask  # one compile per model
    return np.asarray(_jitted(model)({"params": params}, tokens, attention_mask=mask))


def _hf_logits(hf, tokens, mask=None, positions=None):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens),
            attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _relative_error(ours, reference, real=None):
    if real is not None:
        ours, reference = ours[real.astype(bool)], reference[real.astype(bool)]
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)


def test_logits_match_transformers(converted):
    variant, hf, _, model, params = converted
    tokens = _tokens()
    error = _relative_error(_ours(model, params, tokens), _hf_logits(hf, tokens))
    print(f"{variant}: max relative logit error {error:.2e}")
    assert error <= TOLERANCE


def test_right_padded_batch_matches_transformers(converted):
    variant, hf, _, model, params = converted
    tokens, mask = _tokens(1), np.ones((BATCH, LENGTH), np.int32)
    mask[1, LENGTH - PAD :] = 0
    error = _relative_error(_ours(model, params, tokens, mask), _hf_logits(hf, tokens, mask), mask)
    print(f"{variant}: right padding, max relative logit error {error:.2e}")
    assert error <= TOLERANCE


def test_left_padded_batch_matches_transformers(converted):
    variant, hf, _, model, params = converted
    tokens, mask = _tokens(2), np.ones((BATCH, LENGTH), np.int32)
    mask[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    reference = _hf_logits(hf, tokens, mask, positions)
    error = _relative_error(_ours(model, params, tokens, mask), reference, mask)
    print(f"{variant}: left padding, max relative logit error {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize(
    "variant, change",
    [
        ("gpt2", dict(query_scale=1.0)),
        ("neox_parallel", dict(rotary_fraction=0.5)),
        ("neox_sequential", dict(parallel_residual=True)),
        ("llama_gqa_llama3", dict(rope_scaling=None)),
        ("gemma2", dict(sliding_layers=())),
        ("gemma2", dict(query_scale=None)),
    ],
)
def test_parity_check_detects_a_wrong_model(variant, change):
    """The tolerance is meaningful: one wrong architectural choice breaks it by far."""
    _, hf, _, model, params = _converted(variant)
    wrong = type(model)(model.config.replace(**change))
    tokens = _tokens()
    error = _relative_error(_ours(wrong, params, tokens), _hf_logits(hf, tokens))
    print(f"{variant} with {change}: max relative logit error {error:.2e}")
    assert error > 100 * TOLERANCE


def _assert_trees_identical(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_export_round_trip(converted, tmp_path):
    variant, hf, folder, model, params = converted
    # Our tensors are HF's tensors, bit for bit.
    original = pretrained.read_safetensors(folder / "model.safetensors")
    exported = convert.params_to_hf(params, model.config)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].tobytes() == value.tobytes(), name
    # transformers loads our export and computes our logits.
    models.save_pretrained(tmp_path, model, params)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = _tokens(3)
    error = _relative_error(_ours(model, params, tokens), _hf_logits(reloaded_hf, tokens))
    print(f"{variant}: export, max relative logit error {error:.2e}")
    assert error <= TOLERANCE
    # So do we, bit-identically.
    model2, params2, _ = models.from_pretrained(tmp_path)
    assert model2.config == model.config
    _assert_trees_identical(params2, params)


def test_sharded_checkpoints_load(tmp_path):
    _, hf, _, model, params = _converted("llama_gqa_llama3")
    hf.save_pretrained(tmp_path / "hf_sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    _assert_trees_identical(models.from_pretrained(tmp_path / "hf_sharded")[1], params)

    models.save_pretrained(tmp_path / "ours_sharded", model, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours_sharded" / "model.safetensors").exists()
    _assert_trees_identical(models.from_pretrained(tmp_path / "ours_sharded")[1], params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours_sharded", attn_implementation="eager"
    ).eval()
    tokens = _tokens()
    assert _relative_error(_ours(model, params, tokens), _hf_logits(reloaded, tokens)) <= TOLERANCE


def test_bfloat16_checkpoint_loads(tmp_path):
    hf = _hf_model("gemma2", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    # Default: float32 compute and storage, the bf16 values exactly.
    model, params, _ = models.from_pretrained(tmp_path / "bf16")
    embed = np.asarray(params["embed"])
    assert embed.dtype == np.float32
    np.testing.assert_array_equal(embed, state["model.embed_tokens.weight"])
    tokens = _tokens()
    # fp32 compute on the same (bf16) values; a fresh load, since `.to(bfloat16)` also rounded
    # the rotary frequency buffers.
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager"
    )
    reference = _hf_logits(hf32.eval(), tokens)
    assert _relative_error(_ours(model, params, tokens), reference) <= TOLERANCE
    # bfloat16 storage and compute: params are the file's bytes; logits are close.
    model16, params16, _ = models.from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert model16.config.dtype == model16.config.param_dtype == "bfloat16"
    assert np.asarray(params16["embed"]).dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(params16["embed"], np.float32), embed)
    assert _relative_error(_ours(model16, params16, tokens), reference) < 0.1
    # Mixed: bf16 compute over float32 storage.
    model_mixed, params_mixed, _ = models.from_pretrained(
        tmp_path / "bf16", dtype="bfloat16", param_dtype="float32"
    )
    assert model_mixed.config.param_dtype == "float32"
    assert np.asarray(params_mixed["embed"]).dtype == np.float32
    # Export keeps bf16: HF's file and ours hold the same bytes.
    models.save_pretrained(tmp_path / "out", model16, params16)
    original = pretrained.read_safetensors(tmp_path / "bf16" / "model.safetensors")
    exported = pretrained.read_safetensors(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert value.dtype == exported[name].dtype and value.tobytes() == exported[name].tobytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.fixture
def llama_folder():
    return _converted("llama_gqa_llama3")[2]


def _edited_copy(source, destination, edit):
    shutil.copytree(source, destination)
    tensors = pretrained.read_safetensors(source / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    pretrained.write_safetensors(destination / "model.safetensors", tensors)
    return destination


def test_missing_tensor_is_named(llama_folder, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    folder = _edited_copy(llama_folder, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"(?s)Missing.*layers\.1\.self_attn\.k_proj.*\(32, 64\)"):
        models.from_pretrained(folder)


def test_shape_mismatch_names_tensor_shapes_and_file(llama_folder, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(tensors):
        tensors[name] = np.zeros((127, 64), np.float32)

    folder = _edited_copy(llama_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError) as error:
        models.from_pretrained(folder)
    message = str(error.value)
    assert name in message and "(127, 64)" in message and "(128, 64)" in message
    assert str(folder / "model.safetensors") in message


def test_unexpected_tensor_is_named(llama_folder, tmp_path):
    def edit(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)

    folder = _edited_copy(llama_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=r"Unexpected.*q_norm\.weight"):
        models.from_pretrained(folder)


def test_gpt2_without_prefix_with_buffers_and_tied_head_loads(tmp_path):
    _, _, folder, _, params = _converted("gpt2")
    original = pretrained.read_safetensors(folder / "model.safetensors")

    # Old exports: GPT2Model keys without `transformer.`, causal-mask buffers, a saved head.
    def edit(tensors):
        tensors.clear()
        for name, value in original.items():
            tensors[name.removeprefix("transformer.")] = np.array(value)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.uint8))
        tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        tensors["lm_head.weight"] = np.array(original["transformer.wte.weight"])

    _assert_trees_identical(
        models.from_pretrained(_edited_copy(folder, tmp_path / "old", edit))[1], params
    )


def test_missing_files_raise_file_not_found(llama_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        models.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
        models.from_pretrained(tmp_path / "empty")
    shutil.copy(llama_folder / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"(?s)No weights in .*empty.*model\.safetensors"):
        models.from_pretrained(tmp_path / "empty")


def test_unknown_model_type_or_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"(?s)'mamba'.*gpt2.*gpt_neox.*llama.*gemma2"):
        convert.config_from_hf({"model_type": "mamba"})
    hf = _hf_config("llama_gqa_llama3").to_dict()
    hf["architectures"] = ["LlamaForSequenceClassification"]
    with pytest.raises(ValueError, match=r"(?s)'LlamaForSequenceClassification'.*LlamaForCausalLM"):
        convert.config_from_hf(hf)


def test_old_and_new_config_layouts_agree():
    # Llama: transformers 4 puts rope_theta / rope_scaling at the top level.
    new = _hf_config("llama_gqa_llama3").to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "head_dim")}
    rope = dict(new["rope_parameters"])
    old.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    assert convert.config_from_hf(old) == convert.config_from_hf(new)
    assert convert.config_from_hf(new).head_dim == 16  # derived when absent
    # GPT-NeoX: rotary_pct / rotary_emb_base.
    new = _hf_config("neox_parallel").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rotary_pct=0.25, rotary_emb_base=10_000)
    assert convert.config_from_hf(old) == convert.config_from_hf(new)
    config = convert.config_from_hf(new)
    assert (config.rotary_fraction, config.activation, config.tied_embeddings) == (0.25, "gelu", 0)
    # Gemma 2: no layer_types means even layers slide.
    new = _hf_config("gemma2").to_dict()
    old = {k: v for k, v in new.items() if k != "layer_types"}
    assert convert.config_from_hf(old) == convert.config_from_hf(new)
    config = convert.config_from_hf(new)
    assert config.sliding_layers == (0, 2) and config.sliding_window == 4
    assert config.activation == "gelu_tanh" and config.tied_embeddings
    # GPT-2: tanh GELU, tied by default.
    config = convert.config_from_hf(_hf_config("gpt2").to_dict())
    assert config.activation == "gelu_tanh" and config.tied_embeddings and config.mlp_dim == 256


def test_config_to_hf_refuses_what_a_family_cannot_express():
    llama = convert.config_from_hf(_hf_config("llama_gqa_llama3").to_dict())
    assert convert.config_from_hf(convert.config_to_hf(llama)) == llama
    with pytest.raises(ValueError, match="post_norms"):
        convert.config_to_hf(llama.replace(post_norms=True))
    # A framework-trained 'custom' config goes out as the family that expresses it.
    custom = ModelConfig(norm="rmsnorm", gated_mlp=True, positions="rotary", activation="silu")
    custom = custom.replace(attn_bias=False, attn_out_bias=False, mlp_bias=False)
    assert convert.config_to_hf(custom)["model_type"] == "llama"
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        convert.config_to_hf(custom.replace(parallel_residual=True))


class _StubTokenizer:
    """Stands in for `interp.models.tokenizer.Tokenizer`: ids and a save(folder)."""

    bos_id, eos_id, pad_id = 1, 2, None

    def save(self, folder):
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        backend.save(str(pathlib.Path(folder) / "tokenizer.json"))


def test_save_pretrained_writes_the_tokenizer_and_its_ids(llama_folder, tmp_path):
    model, params, tokenizer = models.from_pretrained(llama_folder)
    assert tokenizer is None  # no tokenizer.json
    models.save_pretrained(tmp_path, model, params, tokenizer=_StubTokenizer())
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)
    assert hf_config["pad_token_id"] is None
    assert (tmp_path / "tokenizer.json").exists()
    if importlib.util.find_spec("interp.models.tokenizer"):
        assert models.from_pretrained(tmp_path)[2] is not None


def test_save_pretrained_replaces_an_export_atomically(llama_folder, tmp_path, monkeypatch):
    model, params, _ = models.from_pretrained(llama_folder)
    out = tmp_path / "out"
    models.save_pretrained(out, model, params, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    models.save_pretrained(out, model, params)  # Unsharded now: no stale shards remain.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        models.save_pretrained(out, model, jax.tree.map(lambda x: x + 1, params))
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # No staging debris.


def test_save_pretrained_refuses_a_folder_with_other_files(llama_folder, tmp_path):
    model, params, _ = models.from_pretrained(llama_folder)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt"):
        models.save_pretrained(tmp_path, model, params)
    assert (tmp_path / "notes.txt").read_text() == "precious"
