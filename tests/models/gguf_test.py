"""GGUF models: from_pretrained of a .gguf file computes the logits of the transformers model the
file was written from, and those of transformers' own GGUF loader, for every architecture and
quantization type; the model exports to a Hugging Face folder; bad files are clear errors."""

import os
import pathlib

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from interp import models
from interp.models import gguf_tokenizer
from tests.models import gguf_testing

TOLERANCE = 1e-4  # max |ours - reference| / max |reference|
TOKENS = np.random.default_rng(0).integers(0, gguf_testing.VOCAB, (2, 16))


def _ours(path):
    model, params, _ = models.from_pretrained(path)
    return np.asarray(jax.jit(model.apply)({"params": params}, TOKENS))


def _torch(model):
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def _transformers_gguf(path):
    path = pathlib.Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return _torch(model.eval())


def _close(ours, reference, what):
    scale = np.abs(reference).max()
    error = np.abs(ours - reference).max() / scale
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e}"


def _check(variant, qtype, tmp_path, against_transformers_gguf=True):
    path, source = gguf_testing.write(variant, qtype, tmp_path)
    want = _torch(source)
    # Logits that vary along the sequence: a wrong Q/K row order or rotary would show.
    assert want.std(axis=1).mean() > 0.3
    ours = _ours(path)
    _close(ours, want, f"{variant} {qtype} vs the transformers model it was written from")
    if against_transformers_gguf:
        _close(ours, _transformers_gguf(path), f"{variant} {qtype} vs transformers' GGUF load")


@pytest.mark.parametrize("variant", gguf_testing.VARIANTS)
def test_each_architecture_matches_transformers(variant, tmp_path):
    _check(variant, "Q8_0", tmp_path)


@pytest.mark.parametrize("variant", gguf_testing.OTHER_VARIANTS)
def test_settings_transformers_gguf_loader_misses_are_read(variant, tmp_path):
    """Qwen 3's key_length, Gemma 2's soft caps, Gemma 3's linear rope scaling: transformers'
    GGUF loader takes its config class's defaults for these, so only the source model counts."""
    _check(variant, "Q8_0", tmp_path, against_transformers_gguf=False)


@pytest.mark.parametrize("qtype", gguf_testing.QTYPES)
def test_each_quantization_type_matches_transformers(qtype, tmp_path):
    _check("llama", qtype, tmp_path)


def test_a_folder_holding_one_gguf_loads_and_exports_to_hugging_face(tmp_path):
    path, source = gguf_testing.write("qwen2", "Q4_0", tmp_path / "gguf")
    model, params, tokenizer = models.from_pretrained(path.parent)
    out = tmp_path / "hf"
    models.save_pretrained(out, model, params, tokenizer)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _close(_torch(exported.eval()), _torch(source), "the exported folder in transformers")
    _close(_ours(out), _torch(source), "the exported folder in interp")
    # The file's tokenizer travels with it: transformers reads the same ids from the folder's
    # tokenizer.json. (AutoTokenizer would pick Qwen2Tokenizer by the model type, which
    # rebuilds Qwen 2's own pre-tokenizer: not this test vocabulary's.)
    text = "Call me Ishmael, 1234 naïve.\n  Emma"
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert tokenizer.encode(text) == models.from_pretrained(out)[2].encode(text)


def _rewrite(path, out, *, arch=None, drop=(), extra=None, qtype_of=None):
    """A copy of a GGUF file with another architecture name, without some keys or with an
    extra tensor (for the error tests)."""
    reader = gguf.GGUFReader(path)
    meta = gguf_tokenizer.read_metadata(reader)
    old_arch = meta["general.architecture"]
    arch = arch or old_arch
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        kind = field.types[0]
        value = field.contents()
        key = key.replace(f"{old_arch}.", f"{arch}.", 1)
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for tensor in reader.tensors:
        kind = (qtype_of or {}).get(tensor.name, tensor.tensor_type)
        data = np.asarray(tensor.data)
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(tensor.name, data.view(np.uint8), raw_dtype=kind)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path, _ = gguf_testing.write("llama", "Q8_0", tmp_path_factory.mktemp("gguf"))
    return path


def test_an_unknown_architecture_is_named(llama_file, tmp_path):
    bad = _rewrite(llama_file, tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(ValueError, match=r"architecture 'phi3'.*supports gemma2, gemma3, llama"):
        models.from_pretrained(bad)


def test_a_type_that_cannot_be_dequantized_is_named(llama_file, tmp_path):
    # An embedding stored as 8-bit integers (GGML type I8): no dequantization exists.
    bad = _rewrite(
        llama_file,
        tmp_path / "i8.gguf",
        qtype_of={"output.weight": gguf.GGMLQuantizationType.I8},
    )
    with pytest.raises(ValueError, match=r"output\.weight .* stored as I8"):
        models.from_pretrained(bad)


def test_a_truncated_file_says_fetch_it_again(llama_file, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = llama_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated download"):
        models.from_pretrained(bad)


def test_llama3_rope_frequencies_are_refused(llama_file, tmp_path):
    bad = _rewrite(
        llama_file, tmp_path / "rope.gguf", extra={"rope_freqs.weight": np.ones(32, np.float32)}
    )
    with pytest.raises(ValueError, match="rope_freqs.weight.*Hugging Face folder"):
        models.from_pretrained(bad)


def test_an_unknown_tensor_and_missing_metadata_are_named(llama_file, tmp_path):
    bad = _rewrite(
        llama_file,
        tmp_path / "extra.gguf",
        extra={"blk.0.ffn_gate_inp.weight": np.ones((4, 256), np.float32)},
    )
    with pytest.raises(ValueError, match="ffn_gate_inp"):
        models.from_pretrained(bad)
    bad = _rewrite(llama_file, tmp_path / "nometa.gguf", drop={"llama.block_count"})
    with pytest.raises(ValueError, match="no llama.block_count"):
        models.from_pretrained(bad)


def test_a_folder_with_two_gguf_files_asks_for_one(llama_file, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        os.symlink(llama_file, tmp_path / name)
    with pytest.raises(ValueError, match="several GGUF files"):
        models.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained(tmp_path / "c.gguf")


def test_a_home_relative_path_and_a_file_that_is_not_gguf(llama_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    os.symlink(llama_file, tmp_path / "model.gguf")
    model, _, _ = models.from_pretrained("~/model.gguf")
    assert model.config.family == "llama"
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="does not start with GGUF's magic bytes"):
        models.from_pretrained(tmp_path / "not.gguf")
