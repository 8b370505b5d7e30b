"""Hub ids: from_pretrained('org/name', revision=...) resolves through huggingface_hub's cache in
offline mode (the suite runs with HF_HUB_OFFLINE=1), to the commit a branch or tag points at."""

import json
import pathlib

import numpy as np
import pytest
import torch
from huggingface_hub import constants

from interp import models
from interp.models import hub
from interp.models import tokenizer as tokenizer_lib
from tests.models import hf_testing

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
_TOKENIZER = tokenizer_lib.train_bpe(["Call me Ishmael. Some years ago"] * 2, vocab_size=300)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding 'org/tiny' at two commits (main -> A, tag v2 -> B), as
    huggingface_hub lays it out (models--org--tiny/refs, snapshots/<commit>/)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for ref, commit, seed in (("main", COMMIT_A, 0), ("v2", COMMIT_B, 1)):
        model = hf_testing._randomize(hf_testing.hf_model("llama_gqa_llama3"), seed=seed)
        model.save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
        _TOKENIZER.save(str(repo / "snapshots" / commit))  # Jobs need one.
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    # A repository with PyTorch weights only.
    bin_only = cache / "models--org--pickled" / "snapshots" / COMMIT_A
    pickled = hf_testing.hf_model("llama_gqa_llama3")
    bin_only.mkdir(parents=True)
    pickled.config.to_json_file(bin_only / "config.json")
    torch.save(pickled.state_dict(), bin_only / "pytorch_model.bin")
    (cache / "models--org--pickled" / "refs").mkdir()
    (cache / "models--org--pickled" / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo


def _logits(loaded):
    model, params, _ = loaded
    tokens = np.arange(12)[None] % hf_testing.VOCAB
    return np.asarray(model.apply({"params": params}, tokens))


def _hf_logits(folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.arange(12)[None] % hf_testing.VOCAB).logits.numpy()


def test_a_hub_id_loads_its_main_branch_and_a_pinned_revision(hub_cache):
    main = _logits(models.from_pretrained("org/tiny"))
    want = _hf_logits(hub_cache / "snapshots" / COMMIT_A)
    np.testing.assert_allclose(main, want, atol=1e-4 * np.abs(want).max())
    v2 = _logits(models.from_pretrained("hf://org/tiny", revision="v2"))
    want_v2 = _hf_logits(hub_cache / "snapshots" / COMMIT_B)
    np.testing.assert_allclose(v2, want_v2, atol=1e-4 * np.abs(want_v2).max())
    assert not np.allclose(main, v2)
    pinned = _logits(models.from_pretrained("org/tiny", revision=COMMIT_B))
    np.testing.assert_array_equal(pinned, v2)
    source = hub.resolve("org/tiny", "v2")
    assert (source.repo_id, source.revision) == ("org/tiny", COMMIT_B)
    assert pathlib.Path(source.path) == hub_cache / "snapshots" / COMMIT_B


def test_a_local_folder_of_that_name_comes_first(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_testing._randomize(hf_testing.hf_model("llama_gqa_llama3"), seed=2).save_pretrained(
        tmp_path / "org" / "tiny", safe_serialization=True
    )
    assert not hub.is_hub_id("org/tiny")
    local = _logits(models.from_pretrained("org/tiny"))
    np.testing.assert_allclose(local, _hf_logits(tmp_path / "org" / "tiny"), atol=1e-4 * 10)
    with pytest.raises(ValueError, match="revision='v2' is for Hub ids"):
        models.from_pretrained("org/tiny", revision="v2")


def test_hub_errors_name_the_fix(hub_cache):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        models.from_pretrained("org/absent")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights\. PyTorch \.bin.*GGUF"):
        models.from_pretrained("org/pickled")
    with pytest.raises(FileNotFoundError, match="org/tiny@v3 is not in the Hugging Face cache"):
        models.from_pretrained("org/tiny", revision="v3")


@pytest.mark.parametrize(
    "text, want",
    [
        ("org/name", True),
        ("hf://org/name", True),
        ("EleutherAI/pythia-70m-deduped", True),
        ("gs://bucket/model", False),
        ("/abs/path", False),
        ("relative/path/deeper", False),
        ("model.gguf", False),
        ("org/name@v1.0", True),
        ("org/name@", False),
    ],
)
def test_what_reads_as_a_hub_id(text, want):
    assert hub.is_hub_id(text) is want


def test_a_job_pins_the_commit_its_first_run_resolved(hub_cache, tmp_path):
    from interp.jobs import workdir as workdir_lib

    first = tmp_path / "first"
    first.mkdir()
    a = _logits(workdir_lib.load_model(first, "org/tiny", job="the test job"))
    assert (
        json.loads((first / workdir_lib.DATA_FILE).read_text())["model"] == f"org/tiny@{COMMIT_A}"
    )
    (hub_cache / "refs" / "main").write_text(COMMIT_B)  # main moves on.
    (first / "checkpoint").mkdir()  # The first run wrote something.
    again = _logits(workdir_lib.load_model(first, "org/tiny", job="the test job"))
    np.testing.assert_array_equal(again, a)  # The rerun keeps the commit it started on.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    b = _logits(workdir_lib.load_model(fresh, "org/tiny", job="the test job"))
    assert not np.allclose(a, b)
    tagged = _logits(workdir_lib.load_model(tmp_path, "org/tiny@v2", job="the test job"))
    np.testing.assert_array_equal(tagged, b)
    with pytest.raises(ValueError, match="disagree"):
        hub.resolve("org/tiny@v2", revision="main")
