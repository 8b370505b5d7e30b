"""The notebooks in notebooks/ run top to bottom (nbclient, a real kernel), so they never rot:
the pipeline's on a tiny pipeline run, the quickstart on that run's LM (in Colab: SmolLM2), and
released_sae on an offline Hugging Face cache holding small random-weight stand-ins under the
names it loads (a GPT-2 and an SAE in its release's own layout)."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from interp import safetensors_io
from interp.models import pretrained
from interp.models import tokenizer as tokenizer_lib
from interp.models.transformer import init_params
from interp.sae import io as sae_io
from interp.sae import released
from tests import references, runs
from tests.models import testing

# References the suite needs: missing ones skip locally and fail under CI=true.
_HINT = "pip install -e '.[test]' (nbclient, nbformat, ipykernel)"
nbclient = references.require_module("nbclient", _HINT)
nbformat = references.require_module("nbformat", _HINT)
references.require_module("ipykernel", _HINT)

# Every notebook. The pipeline's read a pipeline workdir (INTERP_WORKDIR); quickstart a model
# (INTERP_MODEL); released_sae the Hub (HF_HUB_CACHE, offline).
NOTEBOOKS = ("quickstart.ipynb", "features.ipynb", "steering.ipynb", "influence.ipynb",
             "released_sae.ipynb")  # fmt: skip

COMMIT = "e" * 40
RELEASE, SAE_ID, NUM_LATENTS = "gpt2-small-res-jb", "blocks.8.hook_resid_pre", 96


@pytest.fixture(scope="module")
def workdir(tiny_pipeline):
    return tiny_pipeline[0]


def _snapshot(cache, repo_id):
    """The folder of repo_id's snapshot at COMMIT, main pointing at it (huggingface_hub's
    layout: models--org--name/refs/main, snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path):
    """A Hugging Face cache holding what released_sae.ipynb loads, at small sizes with random
    weights: the release's model (a 9-layer GPT-2 of width 32 and a small byte-level BPE) and
    its SAE id in the release's layout (SAELens 2.x's cfg.json keys, sae_weights.safetensors)."""
    cache = tmp_path / "hub"
    release = released.RELEASES[RELEASE]
    tokenizer = tokenizer_lib.train_bpe(
        ["The whale rose from the sea, and the whale spouted. Mr. Darcy said that"] * 4,
        vocab_size=300,
    )
    config = dataclasses.replace(testing.GPT2_LIKE, vocab_size=tokenizer.vocab_size,
                                 num_layers=9, max_len=128)  # fmt: skip
    pretrained.save_pretrained(_snapshot(cache, release.model), config, init_params(config),
                               tokenizer)  # fmt: skip
    d = config.d_model
    rng = np.random.default_rng(0)
    folder = _snapshot(cache, release.repo_id) / SAE_ID
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2-small", "hook_point": SAE_ID, "hook_point_layer": 8,
        "hook_point_head_index": None, "d_in": d, "d_sae": NUM_LATENTS, "expansion_factor": 3,
        "b_dec_init_method": "geometric_median", "l1_coefficient": 8e-05, "lr": 0.0004,
        "dtype": "torch.float32", "device": "cpu", "context_size": 128,
    }))  # fmt: skip
    safetensors_io.write(folder / sae_io.WEIGHTS_FILE, {
        "W_enc": rng.normal(0, 1 / d**0.5, (d, NUM_LATENTS)).astype(np.float32),
        "b_enc": rng.normal(0, 0.1, (NUM_LATENTS,)).astype(np.float32),
        "W_dec": rng.normal(0, 1 / d**0.5, (NUM_LATENTS, d)).astype(np.float32),
        "b_dec": np.zeros(d, np.float32),
    })  # fmt: skip
    return cache


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, request, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", runs.ROOT)  # The checkout's interp, in the kernel too.
    if name == "released_sae.ipynb":
        monkeypatch.setenv("HF_HUB_CACHE", str(request.getfixturevalue("hub_cache")))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        workdir = request.getfixturevalue("workdir")
        monkeypatch.setenv("INTERP_WORKDIR", workdir)
        monkeypatch.setenv("INTERP_MODEL", os.path.join(workdir, "lm", "export"))
    notebook = nbformat.read(os.path.join(runs.ROOT, "notebooks", name), as_version=4)
    # Run in a scratch folder so files the notebooks write stay out of the checkout.
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name == "features.ipynb":
        html = [o for o in outputs if "text/html" in o.get("data", {})]
        assert html and "<iframe srcdoc=" in html[-1].data["text/html"]
        assert "x its max" in text
        # The model the analysis stage studied: the tiny run's own LM ('' in its config).
        assert f"{workdir}/lm/export | blocks_1/resid_post topk" in text
    if name == "steering.ipynb":
        assert "10 x max" in text and "unsteered" in text
        assert "Steering sweep:" in text and "add generated x4" in text  # The stage's sweep.
        assert f"{workdir}/lm/export | blocks_1/resid_post" in text
    if name == "influence.ipynb":
        assert "Call me Ishmael" in text
    if name == "quickstart.ipynb":
        assert "layers" in text and "blocks_0/attn/pattern" in text
        assert "unsteered |" in text and "steered |" in text
    if name == "released_sae.ipynb":
        # Loaded by name from the cache: the release's site, and this SAE's width.
        assert f"{RELEASE} {SAE_ID} -> blocks_8/resid_pre: relu {NUM_LATENTS} latents" in text
        assert "openai-community/gpt2 gpt2 9 layers of width 32" in text
        found = re.findall(r"^feature (\d+): ", text, re.M)
        assert len(found) == 5 and all(int(f) < NUM_LATENTS for f in found)
        completions = dict(re.findall(r"^ *(\S.*?) \| (.*)$", text, re.M))
        assert set(completions) == {"unsteered", "clamp x2", "clamp x5", "clamp x10",
                                    "add x5 (gen)", "add x10 (gen)"}  # fmt: skip
        # Steering changes what the model writes.
        assert completions["clamp x10"] != completions["unsteered"]
        assert completions["add x10 (gen)"] != completions["unsteered"]
