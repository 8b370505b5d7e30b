"""The steering job and experiments/steer.py: completions side by side for each strength."""

import json
import os

import jax
import numpy as np
import pytest

from interp import models
from interp import sae as saes
from interp.jobs import steer as job
from interp.models import tokenizer as tokenizer_lib
from interp.sae.modules import SAEConfig
from interp.sae.modules import init_params as sae_init
from tests import runs
from tests.models.testing import LLAMA_LIKE

TEXT = [
    "The whale rose from the sea and the sailors watched it swim away.",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "It is a truth universally acknowledged that a single man must be in want of a wife.",
] * 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random-weight model with a tokenizer, an SAE on its residual stream, some text."""
    root = tmp_path_factory.mktemp("steer")
    tokenizer = tokenizer_lib.train_bpe(TEXT, vocab_size=300)
    config = LLAMA_LIKE.replace(vocab_size=tokenizer.vocab_size, max_len=64)
    params = jax.tree.map(lambda p: 8.0 * p, models.init_params(config))
    models.save_pretrained(root / "model", config, params, tokenizer=tokenizer)
    sae_config = SAEConfig(architecture="topk", d_in=config.d_model, num_latents=64, k=4,
                           hook_name="blocks_1/resid_post")  # fmt: skip
    saes.save(root / "sae", sae_config, sae_init(sae_config, jax.random.key(0)))
    (root / "text.txt").write_text("\n\n".join(TEXT))
    return root


def _overrides(root, **more):
    return {
        "data.text_path": str(root / "text.txt"),
        "data.max_documents": 0,
        "steering.model_path": str(root / "model"),
        "steering.sae": str(root / "sae"),
        "steering.max_rows": 8,
        "steering.batch_size": 4,
        "steering.max_new_tokens": 5,
        **more,
    }


def test_main_prints_completions_side_by_side(folders, tmp_path):
    workdir = tmp_path / "steering"
    result = runs.run_main("experiments.steer", "configs/demo.py:tiny=True", str(workdir),
                           *runs.flags(**_overrides(folders)), timeout=300)  # fmt: skip
    with open(workdir / job.RESULTS_FILE) as f:
        results = json.load(f)
    strengths = [entry["strength"] for entry in results["completions"]]
    assert strengths == [None, 0.0, 2.0, 5.0, 10.0]
    assert "unsteered" in result.stdout and "10 x max" in result.stdout
    maxima = np.load(workdir / "max_activations.npy")
    assert results["max_activation"] == pytest.approx(float(maxima[results["feature"]]))
    for entry in results["completions"][1:]:
        assert entry["value"] == pytest.approx(entry["strength"] * results["max_activation"])
    assert os.path.exists(workdir / "config.json")


def test_a_chosen_feature_outside_the_sae_is_refused(folders, tmp_path):
    from configs import demo

    config = runs.override(demo.get_config("tiny=True"), **_overrides(folders))
    config.steering.feature = 64
    with pytest.raises(ValueError, match="outside 0..63"):
        job.run(config, str(tmp_path / "bad"))
