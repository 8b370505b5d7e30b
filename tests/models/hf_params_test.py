"""Parity with transformers: the contract of `interp.models.hf_params` (and the configs of
`hf_config` it is read with).

Each family is a tiny random-weight HF model (fp32, eager attention) saved with
`save_pretrained`, loaded with our `from_pretrained`, and compared on logits: max |ours - hf| /
max |hf| <= 1e-4 over real (unpadded) positions (see `hf_testing`).
"""

import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from interp import models, safetensors_io
from interp.models import hf_params
from interp.models.transformer import init_cache
from tests.models import hf_testing
from tests.models.hf_testing import BATCH, LENGTH, PAD, TOLERANCE


@pytest.fixture(params=hf_testing.VARIANTS)
def converted(request):
    return hf_testing.converted(request.param)


def test_logits_match_transformers(converted):
    variant, hf, _, model, params = converted
    tokens = hf_testing.random_tokens()
    ours, reference = hf_testing.ours(model, params, tokens), hf_testing.hf_logits(hf, tokens)
    error = hf_testing.relative_error(ours, reference)
    print(f"{variant}: max relative logit error {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("variant", hf_testing.MQA_VARIANTS)
def test_multi_query_attention_matches_transformers(variant):
    _, hf, _, model, params = hf_testing.converted(f"{variant}_mqa")
    assert model.config.num_kv_heads == 1
    tokens = hf_testing.random_tokens()
    error = hf_testing.relative_error(
        hf_testing.ours(model, params, tokens), hf_testing.hf_logits(hf, tokens)
    )
    print(f"{variant} with one kv head: max relative logit error {error:.2e}")
    assert error <= TOLERANCE


def test_multimodal_gemma3_loads_as_its_language_model():
    variant, hf, folder, model, params = hf_testing.converted("gemma3_multimodal")
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    assert any(
        n.startswith("vision_tower.") for n in safetensors_io.read(folder / "model.safetensors")
    )
    text_only = hf_testing.converted("gemma3")[3].config
    assert model.config == text_only.replace(final_softcap=None)
    tokens = hf_testing.random_tokens()
    error = hf_testing.relative_error(
        hf_testing.ours(model, params, tokens), hf_testing.hf_logits(hf, tokens)
    )
    print(f"{variant}: text-only, max relative logit error {error:.2e}")
    assert error <= TOLERANCE


def test_right_padded_batch_matches_transformers(converted):
    variant, hf, _, model, params = converted
    tokens, mask = hf_testing.random_tokens(1), np.ones((BATCH, LENGTH), np.int32)
    mask[1, LENGTH - PAD :] = 0
    ours = hf_testing.ours(model, params, tokens, mask)
    error = hf_testing.relative_error(ours, hf_testing.hf_logits(hf, tokens, mask), mask)
    print(f"{variant}: right padding, max relative logit error {error:.2e}")
    assert error <= TOLERANCE


def test_left_padded_batch_matches_transformers(converted):
    variant, hf, _, model, params = converted
    tokens, mask = hf_testing.random_tokens(2), np.ones((BATCH, LENGTH), np.int32)
    mask[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    reference = hf_testing.hf_logits(hf, tokens, mask, positions)
    error = hf_testing.relative_error(hf_testing.ours(model, params, tokens, mask), reference, mask)
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
        ("gemma3", dict(rope_local_theta=1_000_000.0)),  # the local rotary base
        ("gemma3", dict(rope_factor=1.0)),  # linear scaling of the global layer
        ("gemma3", dict(sliding_layers=(0, 2, 4))),  # 1:1, not the 5:1 pattern
        ("gemma3", dict(qk_norm=False)),
        ("qwen2", dict(sliding_layers=())),  # use_sliding_window mapped to layers 1, 2
        ("qwen2", dict(attn_bias=False)),
        ("qwen3", dict(rope_factor=2.0)),  # yarn factor
        ("qwen3", dict(rope_beta_fast=32.0)),
        ("qwen3", dict(rope_beta_slow=2.0)),
        ("qwen3", dict(rope_truncate=False)),
        ("qwen3", dict(rope_attention_factor=1.0)),
        ("mistral", dict(sliding_layers=())),
        ("mistral", dict(rope_scaling=None)),  # linear
        ("llama_dynamic", dict(rope_factor=2.0)),
    ],
)
def test_parity_check_detects_a_wrong_model(variant, change):
    """The tolerance is meaningful: one wrong architectural choice breaks it by far."""
    _, hf, _, model, params = hf_testing.converted(variant)
    wrong = type(model)(model.config.replace(**change))
    tokens = hf_testing.random_tokens()
    ours, reference = hf_testing.ours(wrong, params, tokens), hf_testing.hf_logits(hf, tokens)
    error = hf_testing.relative_error(ours, reference)
    print(f"{variant} with {change}: max relative logit error {error:.2e}")
    assert error > 100 * TOLERANCE


def test_export_round_trip(converted, tmp_path):
    variant, hf, folder, model, params = converted
    # Our tensors are HF's tensors, bit for bit.
    original = safetensors_io.read(folder / "model.safetensors")
    exported = hf_params.params_to_hf(params, model.config)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].tobytes() == value.tobytes(), name
    # transformers loads our export and computes our logits.
    models.save_pretrained(tmp_path, model, params)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = hf_testing.random_tokens(3)
    ours, reference = (
        hf_testing.ours(model, params, tokens),
        hf_testing.hf_logits(reloaded_hf, tokens),
    )
    error = hf_testing.relative_error(ours, reference)
    print(f"{variant}: export, max relative logit error {error:.2e}")
    assert error <= TOLERANCE
    # So do we, bit-identically.
    model2, params2, _ = models.from_pretrained(tmp_path)
    assert model2.config == model.config
    hf_testing.assert_trees_identical(params2, params)


@pytest.fixture
def llama_folder():
    return hf_testing.converted("llama_gqa_llama3")[2]


def _edited_copy(source, destination, edit):
    shutil.copytree(source, destination)
    tensors = safetensors_io.read(source / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    safetensors_io.write(destination / "model.safetensors", tensors)
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
    _, _, folder, _, params = hf_testing.converted("gpt2")
    original = safetensors_io.read(folder / "model.safetensors")

    # Old exports: GPT2Model keys without `transformer.`, causal-mask buffers, a saved head.
    def edit(tensors):
        tensors.clear()
        for name, value in original.items():
            tensors[name.removeprefix("transformer.")] = np.array(value)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.uint8))
        tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        tensors["lm_head.weight"] = np.array(original["transformer.wte.weight"])

    hf_testing.assert_trees_identical(
        models.from_pretrained(_edited_copy(folder, tmp_path / "old", edit))[1], params
    )


def test_dynamic_rope_cached_generation_follows_transformers():
    """Past max_len, dynamic NTK rotates each new token with the base of its own length and
    keeps the cached keys' (see transformer._dynamic_inverse_frequencies), as HF's generate;
    a forward pass over the whole sequence rotates every key with the final length's base."""
    _, _, _, model, params = hf_testing.converted("llama_dynamic")
    hf = hf_testing.hf_model("llama_dynamic")  # fresh: its rotary remembers the longest input
    prompt, steps = hf_testing.random_tokens(4), 6  # 16 tokens > max_position_embeddings = 8
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    reference, tokens = torch.stack(out.logits, 1).numpy(), out.sequences.numpy()
    apply = jax.jit(model.apply)
    cache = init_cache(model.config, BATCH, LENGTH + steps)
    logits, cache = apply({"params": params}, prompt, cache=cache)
    ours = [logits[:, -1]]
    for i in range(LENGTH, LENGTH + steps - 1):
        logits, cache = apply({"params": params}, tokens[:, i : i + 1], cache=cache)
        ours.append(logits[:, 0])
    error = hf_testing.relative_error(np.stack(ours, 1), reference)
    print(f"llama_dynamic: cached steps, max relative logit error {error:.2e}")
    assert error <= TOLERANCE
    whole = hf_testing.ours(model, params, tokens[:, :-1])[:, LENGTH - 1 :]
    assert hf_testing.relative_error(whole, reference) > 100 * TOLERANCE
