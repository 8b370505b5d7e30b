"""The pipeline's SAE stage: runs from the command line, exports loadable SAEs, resumes."""

import json
import os

import numpy as np
import pytest

from configs import demo
from interp import sae as interp_sae
from interp.data import cache as cache_lib
from interp.sae import job
from tests import runs
from tests.runs import ROOT


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    return workdir, runs.run_main("experiments.pipeline", "configs/demo.py:tiny=True", workdir)


def test_pipeline_prints_the_sae_table_and_writes_results(pipeline_run):
    workdir, result = pipeline_run
    config = demo.get_config("tiny=True")
    assert "| SAE | FVU | L0 | dead |" in result.stdout
    with open(os.path.join(workdir, "sae", "eval.json")) as f:
        results = json.load(f)
    assert len(results) == len(config.sae.saes)
    for metrics in results.values():
        assert 0.0 <= metrics["fvu"] < 1.5
        assert metrics["clean_loss"] > 0 and np.isfinite(metrics["spliced_loss"])
    assert cache_lib.is_complete(os.path.join(workdir, "sae", "activations"))


def test_exported_saes_load_and_encode_like_the_trained_ones(pipeline_run):
    workdir, _ = pipeline_run
    names = sorted(os.listdir(os.path.join(workdir, "sae", "saes")))
    topk = next(n for n in names if "-topk-" in n)
    sae, params = interp_sae.load(os.path.join(workdir, "sae", "saes", topk))
    assert sae.config.architecture == "topk"
    cache = cache_lib.ActivationCache.open(os.path.join(workdir, "sae", "activations"))
    x = np.asarray(cache.read(cache.sites[0], 0, 32), np.float32)
    codes = sae.apply({"params": params}, x, method="encode")
    assert np.all(np.sum(np.asarray(codes) != 0, axis=-1) <= sae.config.k)
    x_hat = sae.apply({"params": params}, codes, method="decode")
    fvu = np.sum((x_hat - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert fvu < 1.0


def test_a_new_workdir_reuses_the_cache_and_reproduces_the_saes(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    config = demo.get_config("tiny=True")
    config.sae.model_path = os.path.join(workdir, "lm", "export")
    config.sae.cache_path = os.path.join(workdir, "sae", "activations")
    before = os.path.getmtime(os.path.join(config.sae.cache_path, "metadata.json"))
    results = job.run(config, str(tmp_path / "again"))
    assert os.path.getmtime(os.path.join(config.sae.cache_path, "metadata.json")) == before
    # Same data, seed and config: the same SAEs as the pipeline's.
    with open(os.path.join(workdir, "sae", "eval.json")) as f:
        original = json.load(f)
    for name, metrics in results.items():
        np.testing.assert_allclose(metrics["fvu"], original[name]["fvu"], rtol=1e-4)


def test_names_are_unique_and_readable():
    entries = [
        dict(architecture="topk", k=16, num_latents=64),
        dict(architecture="relu", l1_coefficient=0.3, num_latents=64),
        dict(architecture="relu", l1_coefficient=0.3, num_latents=64),
    ]
    names = job._unique([job.sae_name(e, "blocks_1/resid_post") for e in entries])
    assert names == [
        "blocks_1.resid_post-topk-k16-x64",
        "blocks_1.resid_post-relu-l0.3-x64",
        "blocks_1.resid_post-relu-l0.3-x64-2",
    ]


def test_an_sae_on_a_site_that_is_not_harvested_is_refused():
    config = demo.get_config("tiny=True")
    config.sae.saes = (dict(architecture="topk", k=4, site="blocks_0/mlp/out"),)
    with pytest.raises(ValueError, match="not harvested"):
        job._entries(config.sae)


def test_format_table_has_one_row_per_sae():
    row = dict(fvu=0.1, l0=2.0, dead_fraction=0.0, dense_fraction=0.0, clean_loss=3.0,
               spliced_loss=3.1, loss_recovered=0.9, kl=0.01)  # fmt: skip
    table = job.format_table({"a": row, "b": row})
    assert table.count("\n") == 3 and "| a | 0.100 | 2.0 |" in table


def test_readme_sae_example_runs_on_the_pipeline_output(pipeline_run):
    workdir, _ = pipeline_run
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = [b.split("```", 1)[0] for b in f.read().split("```python\n")[1:]]
    topk = next(n for n in os.listdir(os.path.join(workdir, "sae", "saes")) if "-topk-" in n)
    code = "\n".join(blocks[:2])
    code = code.replace("workdir/demo/lm/export", os.path.join(workdir, "lm", "export"))
    code = code.replace(
        "workdir/demo/sae/saes/blocks_2.resid_post-topk-k16-x1024",
        os.path.join(workdir, "sae", "saes", topk),
    ).replace("blocks_2/resid_post", "blocks_1/resid_post")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    codes = np.asarray(namespace["codes"])
    assert codes.shape[:2] == namespace["tokens"].shape
    assert np.all((codes != 0).sum(-1) <= namespace["sae"].config.k)
