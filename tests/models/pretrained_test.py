"""Tests for interp.models.pretrained: Hugging Face folders (shards, dtypes, tokenizer, files).

The checkpoints are the tiny random-weight HF models of `hf_testing`; the name maps' parity
with transformers is tested in hf_params_test.
"""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from etils import epath

from interp import models, paths, safetensors_io
from interp.models import tokenizer as tokenizer_lib
from tests.models import hf_testing
from tests.models.hf_testing import TOLERANCE
from tests.models.testing import LLAMA_LIKE


@pytest.fixture
def llama_folder():
    return hf_testing.converted("llama_gqa_llama3")[2]


def _logit_error(model, params, hf, tokens):
    ours, reference = hf_testing.ours(model, params, tokens), hf_testing.hf_logits(hf, tokens)
    return hf_testing.relative_error(ours, reference)


def test_sharded_checkpoints_load(tmp_path):
    _, hf, _, model, params = hf_testing.converted("llama_gqa_llama3")
    hf.save_pretrained(tmp_path / "hf_sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    hf_testing.assert_trees_identical(models.from_pretrained(tmp_path / "hf_sharded")[1], params)

    models.save_pretrained(tmp_path / "ours_sharded", model, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours_sharded" / "model.safetensors").exists()
    hf_testing.assert_trees_identical(models.from_pretrained(tmp_path / "ours_sharded")[1], params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours_sharded", attn_implementation="eager"
    ).eval()
    assert _logit_error(model, params, reloaded, hf_testing.random_tokens()) <= TOLERANCE


def test_bfloat16_checkpoint_loads(tmp_path):
    hf = hf_testing.hf_model("gemma2", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    # Default: float32 compute and storage, the bf16 values exactly.
    model, params, _ = models.from_pretrained(tmp_path / "bf16")
    embed = np.asarray(params["embed"])
    assert embed.dtype == np.float32
    np.testing.assert_array_equal(embed, state["model.embed_tokens.weight"])
    tokens = hf_testing.random_tokens()
    # fp32 compute on the same (bf16) values; a fresh load, since `.to(bfloat16)` also rounded
    # the rotary frequency buffers.
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager"
    )
    reference = hf_testing.hf_logits(hf32.eval(), tokens)
    ours = hf_testing.ours(model, params, tokens)
    assert hf_testing.relative_error(ours, reference) <= TOLERANCE
    # bfloat16 storage and compute: params are the file's bytes; logits are close.
    model16, params16, _ = models.from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert model16.config.dtype == model16.config.param_dtype == "bfloat16"
    assert np.asarray(params16["embed"]).dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(params16["embed"], np.float32), embed)
    ours16 = hf_testing.ours(model16, params16, tokens)
    assert hf_testing.relative_error(ours16, reference) < 0.1
    # Mixed: bf16 compute over float32 storage.
    model_mixed, params_mixed, _ = models.from_pretrained(
        tmp_path / "bf16", dtype="bfloat16", param_dtype="float32"
    )
    assert model_mixed.config.param_dtype == "float32"
    assert np.asarray(params_mixed["embed"]).dtype == np.float32
    # Export keeps bf16: HF's file and ours hold the same bytes.
    models.save_pretrained(tmp_path / "out", model16, params16)
    original = safetensors_io.read(tmp_path / "bf16" / "model.safetensors")
    exported = safetensors_io.read(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert value.dtype == exported[name].dtype and value.tobytes() == exported[name].tobytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_missing_files_raise_file_not_found(llama_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        models.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
        models.from_pretrained(tmp_path / "empty")
    shutil.copy(llama_folder / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"(?s)No weights in .*empty.*model\.safetensors"):
        models.from_pretrained(tmp_path / "empty")


TOKENIZER_TEXT = [
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "So she was considering in her own mind, as well as she could, whether the pleasure "
    "of making a daisy-chain would be worth the trouble of getting up.",
] * 10


def test_save_pretrained_writes_the_tokenizer_and_its_ids(tmp_path):
    trained = tokenizer_lib.train_bpe(
        TOKENIZER_TEXT, vocab_size=300, special_tokens=("<pad>", "<s>", "</s>")
    )
    tokenizer = tokenizer_lib.Tokenizer(
        trained.backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    config = LLAMA_LIKE.replace(vocab_size=tokenizer.vocab_size)
    params = models.init_params(config)
    # Without a tokenizer: no tokenizer files, and null token ids in config.json.
    models.save_pretrained(tmp_path / "bare", config, params)
    hf_config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert [hf_config[f"{role}_token_id"] for role in ("bos", "eos", "pad")] == [None] * 3
    assert models.from_pretrained(tmp_path / "bare")[2] is None

    models.save_pretrained(tmp_path / "out", config, params, tokenizer=tokenizer)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [hf_config[f"{role}_token_id"] for role in ("bos", "eos", "pad")] == [1, 2, 0]
    texts = ["Alice was tired of the bank.", "naïve café, 日本語, 🚀 </s> and\ttabs"]
    want = tokenizer.encode_many(texts, add_bos=True)
    # Our loader and transformers read back the same tokenizer: same ids, same specials.
    loaded = models.from_pretrained(tmp_path / "out")[2]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.encode_many(texts, add_bos=True) == want
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    special = (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
    assert special == (1, 2, 0)
    assert [[1] + hf_tokenizer.encode(text) for text in texts] == want


def test_from_pretrained_tokenizer_keeps_the_checkpoints_conventions(tmp_path):
    # Llama and Gemma ship a post-processor that adds <s>, left padding and a chat template:
    # the tokenizer from_pretrained returns (and re-exports) encodes as transformers does.
    trained = tokenizer_lib.train_bpe(
        TOKENIZER_TEXT, vocab_size=300, special_tokens=("<pad>", "<s>", "</s>")
    )
    trained.backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    chat = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tokenizer = tokenizer_lib.Tokenizer(
        trained.backend, "<s>", "</s>", "</s>", padding_side="left", chat_template=chat
    )
    config = LLAMA_LIKE.replace(vocab_size=tokenizer.vocab_size)
    models.save_pretrained(tmp_path / "out", config, models.init_params(config), tokenizer)
    loaded = models.from_pretrained(tmp_path / "out")[2]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = ["Alice was tired of the bank.", "naïve café"]
    assert loaded.encode_many(texts) == hf_tokenizer(texts)["input_ids"]
    assert all(ids[0] == 1 for ids in loaded.encode_many(texts))
    tokens, mask = loaded.encode_batch(texts)
    batch = hf_tokenizer(texts, padding=True)
    assert (tokens.tolist(), mask.tolist()) == (batch["input_ids"], batch["attention_mask"])
    assert loaded.padding_side == hf_tokenizer.padding_side == "left"
    messages = [{"role": "user", "content": "Oh dear!"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == (
        hf_tokenizer.apply_chat_template(messages, tokenize=False)
    )


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

    monkeypatch.setattr(safetensors_io, "write", crash)
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


# --- gs:// (a local fake-gcs-server; see the gcs_bucket fixture) -----------------------------


def _objects(url: str) -> dict[str, bytes]:
    """{name under url: content} of every object under a gs:// folder."""
    folder = epath.Path(url)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _random_params(config):
    """Random parameters of the model's shapes, without compiling its init (quick on CPU)."""
    shapes = jax.eval_shape(functools.partial(models.init_params, config))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _bpe():
    trained = tokenizer_lib.train_bpe(
        TOKENIZER_TEXT, vocab_size=300, special_tokens=("<pad>", "<s>", "</s>")
    )
    return tokenizer_lib.Tokenizer(trained.backend, "<s>", "</s>", "<pad>")


def test_a_gs_round_trip_equals_the_local_one(gcs_bucket, tmp_path):
    tokenizer = _bpe()
    config = LLAMA_LIKE.replace(vocab_size=tokenizer.vocab_size)
    params = _random_params(config)
    url = f"{gcs_bucket}/models/llama"
    models.save_pretrained(tmp_path / "local", config, params, tokenizer)
    models.save_pretrained(url, config, params, tokenizer)
    # The same files, byte for byte, on gs:// as on disk; nothing local named like the bucket.
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert sorted(local) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert _objects(url) == local
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]

    model_local, params_local, tokenizer_local = models.from_pretrained(tmp_path / "local")
    model_gs, params_gs, tokenizer_gs = models.from_pretrained(url)
    assert model_gs.config == model_local.config
    hf_testing.assert_trees_identical(params_gs, params_local)
    tokens = np.asarray(tokenizer_gs.encode_batch(TOKENIZER_TEXT[:2])[0], np.int32)
    np.testing.assert_array_equal(tokens, tokenizer_local.encode_batch(TOKENIZER_TEXT[:2])[0])
    np.testing.assert_array_equal(
        hf_testing.ours(model_gs, params_gs, tokens),
        hf_testing.ours(model_local, params_local, tokens),
    )
    assert (tokenizer_gs.bos_id, tokenizer_gs.eos_id, tokenizer_gs.pad_id) == (1, 2, 0)


def test_sharded_gs_folders_load_tensor_by_tensor(gcs_bucket, monkeypatch):
    # Tensors of 128 KiB (mlp 64 x 512 float32), over the 64 KiB read when a file is opened.
    config = LLAMA_LIKE.replace(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=512)
    params = _random_params(config)
    url = f"{gcs_bucket}/sharded"
    models.save_pretrained(url, config, params, max_shard_bytes=300_000)
    objects = _objects(url)
    shards = sorted(n for n in objects if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads(objects["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == shards

    reads = []
    read_range = paths.read_range

    def recorded(path, start, stop):
        reads.append(stop - start)
        return read_range(path, start, stop)

    def whole(path):
        raise AssertionError(f"{path} was read whole")

    with monkeypatch.context() as patch:
        patch.setattr(paths, "read_range", recorded)
        patch.setattr(paths, "read_bytes", whole)
        _, loaded, _ = models.from_pretrained(url)
    hf_testing.assert_trees_identical(loaded, params)
    largest = max(t.nbytes for t in jax.tree.leaves(params))
    assert largest > 2**16
    # Each shard: its first 64 KiB (the header), then each tensor not in them once.
    assert max(reads) <= largest
    assert sum(reads) <= sum(len(objects[s]) for s in shards) + len(shards) * 2**16

    # Unsharded again: no stale shard stays behind on gs:// either.
    models.save_pretrained(url, config, params)
    assert sorted(_objects(url)) == ["config.json", "model.safetensors"]


def test_an_interrupted_or_damaged_gs_export_is_an_error(gcs_bucket, monkeypatch):
    config = LLAMA_LIKE
    params = _random_params(config)
    url = f"{gcs_bucket}/model"
    models.save_pretrained(url, config, params, max_shard_bytes=20_000)
    first = sorted(n for n in _objects(url) if n.endswith(".safetensors"))[0]
    # A missing shard, then a truncated one: named, never loaded.
    blob = paths.read_bytes(f"{url}/{first}")
    epath.Path(f"{url}/{first}").unlink()
    with pytest.raises(FileNotFoundError, match=first):
        models.from_pretrained(url)
    paths.write_bytes(f"{url}/{first}", blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        models.from_pretrained(url)

    # An export cut short after its weights: no config.json, so not a model.
    write_text = paths.write_text

    def crash_at_config(path, text):
        if str(path).endswith("/config.json"):
            raise KeyboardInterrupt
        write_text(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(paths, "write_text", crash_at_config)
        with pytest.raises(KeyboardInterrupt):
            models.save_pretrained(url, config, params)
    assert "model.safetensors" in _objects(url)
    with pytest.raises(FileNotFoundError, match="config.json is missing.*incomplete"):
        models.from_pretrained(url)
    models.save_pretrained(url, config, params)
    hf_testing.assert_trees_identical(models.from_pretrained(url)[1], params)
