"""The steering job and experiments/steer.py: completions side by side for each strength."""

import json
import os
import subprocess
import sys

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


def _no_model_overrides(tmp_path, **more):
    """A config whose model is missing: a check that comes first must fail before that."""
    return {"steering.model_path": str(tmp_path / "no-model"), **more}


@pytest.mark.parametrize(
    "strengths, match",
    [
        ((2.0, "5"), "holds '5', which is not a number"),
        ((2.0, float("inf")), "holds inf; strengths must be finite"),
        ((-float("inf"),), "holds -inf"),
        ((float("nan"),), "holds nan"),
        ((True, 2.0), "holds True, which is not a number"),
        ("2.0", "must be a list of numbers"),
        (2.0, "must be a list of numbers"),
    ],
)
def test_strengths_that_are_not_finite_numbers_fail_before_the_model_loads(
    tmp_path, strengths, match
):
    from configs import demo

    config = runs.override(demo.get_config("tiny=True"), **_no_model_overrides(tmp_path))
    steering = config.steering.to_dict()  # A config file may hold any type here.
    steering["strengths"] = strengths
    config.steering = steering
    with pytest.raises(ValueError, match=f"config.steering.strengths {match}"):
        job.run(config, str(tmp_path / "steering"))
    # Not even the workdir was prepared: at most the empty folder its lock was taken in.
    workdir = tmp_path / "steering"
    assert not workdir.exists() or not any(workdir.iterdir())


def test_main_refuses_a_string_strength_before_loading_the_model(tmp_path):
    """`--config.steering.strengths=abc` parses as ('abc',): refused by the real main."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.steer", "--config=configs/demo.py:tiny=True",
         f"--workdir={tmp_path / 'steering'}", "--config.steering.strengths=abc",
         *runs.flags(**_no_model_overrides(tmp_path))],
        cwd=runs.ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "config.steering.strengths holds 'abc', which is not a number" in result.stderr
    assert "no-model" not in result.stderr


def test_a_prompt_past_the_model_context_fails_before_the_maxima(folders, tmp_path):
    from configs import demo

    config = runs.override(demo.get_config("tiny=True"), **_overrides(folders))
    config.steering.max_new_tokens = 64  # The model's max_len.
    with pytest.raises(ValueError, match=r"prompt's \d+ tokens \+ config.steering.max_new_tok"):
        job.run(config, str(tmp_path / "long"))
    assert not (tmp_path / "long" / "max_activations.npy").exists()
