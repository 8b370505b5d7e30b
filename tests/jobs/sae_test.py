"""The pipeline's SAE stage: runs from the command line, exports loadable SAEs, resumes."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import demo
from interp import models
from interp import sae as interp_sae
from interp.data import cache as cache_lib
from interp.data import fingerprint as data_fingerprint
from interp.jobs import sae as job
from tests import runs
from tests.runs import ROOT

# The tiny config, trained long enough that the LM depends on the SAE's site (a 6-step LM is
# near chance, so "loss recovered" would mean nothing) and the SAEs reconstruct it. Seconds.
LONGER = {
    "train.steps": 150,
    "train.warmup_steps": 10,
    "checkpoint_every": 150,
    "eval_every": 50,
    "log_every": 50,
    "sae.train.steps": 300,
    "sae.train.warmup_steps": 20,
    "sae.train.checkpoint_every": 150,
    "sae.train.log_every": 50,
}


def _config():
    return runs.override(demo.get_config("tiny=True"), **LONGER)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The pipeline's first two stages, each from its own command line (the later stages run
    in the shared `tiny_pipeline` fixture): (pipeline workdir, the SAE stage's process)."""
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    flags = runs.flags(**LONGER)
    config = "configs/demo.py:tiny=True"
    runs.run_main("experiments.train_lm", config, os.path.join(workdir, "lm"), *flags)
    result = runs.run_main("experiments.train_sae", config, os.path.join(workdir, "sae"), *flags)
    return workdir, result


def test_pipeline_trains_saes_that_reconstruct_and_keep_the_model_working(pipeline_run):
    workdir, result = pipeline_run
    config = _config()
    assert "| SAE | FVU | L0 | dead |" in result.stdout
    with open(os.path.join(workdir, "sae", "eval.json")) as f:
        results = json.load(f)
    assert len(results) == len(config.sae.saes)
    for name, m in results.items():
        # The site matters to the model: zero-ablating it costs far more than splicing.
        assert m["zero_ablation_loss"] > m["clean_loss"] + 1.0, name
        assert m["fvu"] < 0.3, name
        assert m["loss_recovered"] > 0.9 and m["kl"] < 0.05, name
        recovered = (m["zero_ablation_loss"] - m["spliced_loss"]) / (
            m["zero_ablation_loss"] - m["clean_loss"]
        )
        assert m["loss_recovered"] == pytest.approx(recovered, rel=1e-5), name
        k = next(s.get("k") for s in config.sae.saes if f"-{s['architecture']}-" in name)
        if "-topk-" in name:
            assert k - 0.5 < m["l0"] <= k + 1e-6, name  # At most k, and nearly always k.
        elif "-batchtopk-" in name:
            assert abs(m["l0"] - k) < 1.0, name  # k on average over a batch.
        else:
            assert 1.0 < m["l0"] < config.sae.num_latents / 2, name  # Sparse, not dead.
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
    config = _config()
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


def test_a_cache_harvested_from_another_model_is_refused(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    model, params, tokenizer = models.from_pretrained(os.path.join(workdir, "lm", "export"))
    # Same architecture and tokenizer (same config hash), other weights: a retrained model.
    other = str(tmp_path / "other")
    models.save_pretrained(other, model, jax.tree.map(lambda x: x * 1.01, params), tokenizer)
    config = _config()
    config.sae.model_path = other
    config.sae.cache_path = os.path.join(workdir, "sae", "activations")
    before = os.path.getmtime(os.path.join(config.sae.cache_path, "metadata.json"))
    with pytest.raises(job.CacheModelMismatchError, match="delete the cache"):
        job.run(config, str(tmp_path / "sae"))
    assert os.path.getmtime(os.path.join(config.sae.cache_path, "metadata.json")) == before
    assert not os.path.exists(tmp_path / "sae" / "checkpoints")  # Refused before training.


def test_a_typo_in_the_sae_train_config_is_an_error_naming_it(tmp_path):
    config = _config()
    config.sae.train.learning_rte = 1e-3
    with pytest.raises(ValueError, match="learning_rte"):
        job.run(config, str(tmp_path))


def test_a_bad_sae_entry_is_refused_before_anything_is_written(tmp_path):
    config = _config()
    config.sae.saes = (dict(architecture="topk", kk=4),)
    with pytest.raises(ValueError, match="kk"):
        job.run(config, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # No config.json, no harvest.


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


def test_excluded_positions_are_the_same_in_harvest_and_evaluation(pipeline_run, tmp_path):
    from interp.data import activations
    from interp.data.documents import documents, sample_rows

    workdir, _ = pipeline_run
    config = _config()
    config.sae.model_path = os.path.join(workdir, "lm", "export")
    config.sae.cache_path = str(tmp_path / "activations")
    _, _, tokenizer = models.from_pretrained(config.sae.model_path)
    the = tokenizer.encode(" the", add_bos=False)[0]
    config.sae.exclude = {"first": True, "bos": True, "token_ids": (the,)}
    config.sae.train.steps = 4
    results = job.run(config, str(tmp_path / "sae"))
    cache = cache_lib.ActivationCache.open(config.sae.cache_path)
    excluded = {"bos_id": tokenizer.bos_id, "skip_first": True, "exclude_ids": [the]}
    assert cache.metadata["extra"]["exclusions"] == excluded
    # Evaluation scored exactly the positions harvest would keep on the held-out rows (drawn
    # from all of the held-out text by the seed).
    _, heldout = documents(config.data)
    size = config.sae.eval_batch_size
    rows = sample_rows(config.data, heldout, tokenizer, config.sae.eval_batches * size,
                       config.seed)  # fmt: skip
    batches = [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]
    batches = batches[: config.sae.eval_batches]
    excluded["exclude_ids"] = (the,)
    kept = sum(int(activations.keep_mask(b, **excluded).sum()) for b in batches)
    assert kept < sum(b.size for b in batches) - len(batches) * size  # " the" was dropped.
    for name, metrics in results.items():
        assert metrics["num_tokens"] == kept, name
    # Other exclusions make the cache harvest again rather than train on other positions.
    config.sae.exclude = {"first": True}
    job.run(config, str(tmp_path / "sae_default"))
    again = cache_lib.ActivationCache.open(config.sae.cache_path)
    assert again.metadata["extra"]["exclusions"]["exclude_ids"] == []
    config.sae.exclude = {"firsts": True}
    with pytest.raises(ValueError, match="unknown keys \\['firsts'\\]"):
        job.run(config, str(tmp_path / "typo"))


def test_per_head_and_all_heads_saes_train_on_attn_z(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    config = _config()
    config.sae.model_path = os.path.join(workdir, "lm", "export")
    config.sae.cache_path = str(tmp_path / "activations")
    config.sae.sites = ("blocks.1.attn.hook_z",)  # TransformerLens's name for blocks_1/attn/z.
    config.sae.saes = (
        {"architecture": "topk", "k": 4, "num_latents": 64},
        {"architecture": "topk", "k": 4, "num_latents": 64, "hook_head_index": 1},
    )
    config.sae.train.steps = 40
    results = job.run(config, str(tmp_path / "sae"))
    model, params, _ = models.from_pretrained(config.sae.model_path)
    head_dim, heads = model.config.head_dim, model.config.num_heads
    folders = sorted(os.listdir(tmp_path / "sae" / "saes"))
    assert folders == [
        "blocks_1.attn.z-topk-k4-x64",
        "blocks_1.attn.z.h1-topk-k4-x64",
    ]
    for folder in folders:
        sae, sae_params = interp_sae.load(tmp_path / "sae" / "saes" / folder)
        per_head = folder.endswith(".h1-topk-k4-x64")
        assert sae.config.hook_name == "blocks_1/attn/z"
        assert sae.config.hook_head_index == (1 if per_head else None)
        assert sae.config.d_in == (head_dim if per_head else heads * head_dim)
        assert results[folder]["fvu"] < 1.0 and results[folder]["num_tokens"] > 0
    config.sae.saes = ({"architecture": "topk", "k": 4, "hook_head_index": heads},)
    with pytest.raises(ValueError, match=f"hook_head_index {heads} outside 0..{heads - 1}"):
        job.run(config, str(tmp_path / "bad"))


def _cache_arguments(workdir, config):
    """The arguments `job.run` gives `job._cache` (which harvests or reuses the cache)."""
    from interp.data.documents import documents
    from interp.models.fingerprint import fingerprint

    config.sae.model_path = os.path.join(workdir, "lm", "export")
    model, params, tokenizer = models.from_pretrained(config.sae.model_path)
    train_docs, _ = documents(config.data)
    rows = job._harvest_rows(config, train_docs, tokenizer)
    return (config, workdir, config.sae.model_path, model, params, rows,
            fingerprint(model.config, params), job.exclusions(config.sae, tokenizer))  # fmt: skip


def test_a_cache_harvested_from_other_rows_is_harvested_again(pipeline_run, tmp_path):
    """A complete cache is reused only for the token rows it was harvested from: not for a
    cache_path shared with a run of another seed, nor for a corpus since changed in place."""
    workdir, _ = pipeline_run
    config = _config()
    config.sae.cache_path = str(tmp_path / "activations")
    shutil.copytree(os.path.join(workdir, "sae", "activations"), config.sae.cache_path)
    arguments = _cache_arguments(workdir, config)
    metadata = os.path.join(config.sae.cache_path, "metadata.json")
    before = os.path.getmtime(metadata)
    job._cache(*arguments)  # The pipeline's own rows: reused.
    assert os.path.getmtime(metadata) == before
    config.seed = 1  # Other rows: harvested again, and recorded as theirs.
    other = _cache_arguments(workdir, config)
    assert not np.array_equal(other[5], arguments[5])
    cache = job._cache(*other)
    assert os.path.getmtime(metadata) != before
    tokens = cache.metadata["extra"]["rows_from"]["tokens"]
    assert tokens == data_fingerprint.batch_digest(other[5])


def test_a_cache_whose_text_ran_out_is_reused_not_harvested_again(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    config = _config()
    config.sae.cache_path = str(tmp_path / "activations")
    config.sae.harvest_rows = 10**6  # More than the tiny corpus holds.
    arguments = _cache_arguments(workdir, config)
    cache = job._cache(*arguments)
    assert cache.num_rows < config.sae.harvest_rows
    metadata = os.path.join(config.sae.cache_path, "metadata.json")
    before = os.path.getmtime(metadata)
    # The same request would end at the same place: the rerun reuses the cache.
    assert job._cache(*arguments).num_rows == cache.num_rows
    assert os.path.getmtime(metadata) == before


def test_a_stopped_harvest_of_another_model_is_refused(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    config = _config()
    config.sae.cache_path = str(tmp_path / "activations")

    def stopped(start):
        yield {config.sae.sites[0]: np.ones((8, 32), np.float32)}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cache_lib.write_cache(config.sae.cache_path, stopped, extra={"model_fingerprint": "x"},
                              resume=True, commit_seconds=0)  # fmt: skip
    with pytest.raises(job.CacheModelMismatchError, match=r"\(in part: its harvest was stop"):
        job._cache(*_cache_arguments(workdir, config))
    assert cache_lib.progress(config.sae.cache_path)["rows"] == 8  # Left as it was.
