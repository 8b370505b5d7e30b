"""The LM job: runs from its absl main, resumes exactly (on any mesh), shards, exports loadably."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from configs import demo
from interp import models, parallel
from interp.jobs import lm as train
from interp.jobs import workdir as workdir_lib
from tests import runs
from tests.runs import ROOT


def _tiny(**overrides):
    return runs.override(demo.get_config("tiny=True"), **overrides)


def _exported(workdir):
    return safetensors.numpy.load_file(os.path.join(workdir, "export", "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run through the real command line, shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    return workdir, runs.run_main("experiments.train_lm", "configs/demo.py:tiny=True", workdir)


def test_main_writes_config_metrics_checkpoints_and_export(tiny_run):
    workdir, result = tiny_run
    assert "Held-out loss" in result.stdout
    assert "tok/s" in result.stderr and "ETA" in result.stderr
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert any('"eval_loss"' in line for line in lines)
    assert any('"loss"' in line for line in lines)


def test_interrupted_run_resumes_to_the_same_weights(tiny_run, tmp_path):
    workdir, _ = tiny_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # As if the process died after the step-3 checkpoint.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    shutil.rmtree(os.path.join(resumed, "export"))
    train.run(_tiny(), resumed)
    original, again = _exported(workdir), _exported(resumed)
    assert original.keys() == again.keys()
    # Bit-identical in every run here but one, seen once under heavy machine load; the
    # tolerance sits far below the change one optimizer step makes (~1e-3).
    for name in original:
        np.testing.assert_allclose(again[name], original[name], rtol=0, atol=1e-6, err_msg=name)


def _interrupted_copy(workdir, destination):
    """A copy of a finished tiny run as if the process died after the step-3 checkpoint."""
    shutil.copytree(workdir, destination)
    shutil.rmtree(os.path.join(destination, "checkpoints", "6"))
    shutil.rmtree(os.path.join(destination, "export"))
    return destination


def test_resuming_on_another_mesh_is_accepted_and_equal(tiny_run, tmp_path):
    workdir, _ = tiny_run
    resumed = _interrupted_copy(workdir, str(tmp_path / "resumed"))
    # The tiny run used mesh data=-1 (8 devices); finish on data=2, fsdp=2, model=2.
    train.run(_tiny(**{"mesh.data": 2, "mesh.model": 2, "mesh.fsdp": 2}), resumed)
    original, again = _exported(workdir), _exported(resumed)
    for name in original:
        np.testing.assert_allclose(again[name], original[name], atol=2e-5, err_msg=name)
    saved = json.loads(open(os.path.join(resumed, "config.json")).read())
    assert saved["mesh"] == {"data": 2, "fsdp": 2, "model": 2}  # The new layout is recorded.


def test_resuming_with_more_steps_is_refused_when_the_schedule_follows_steps(tiny_run, tmp_path):
    workdir, _ = tiny_run
    copy = _interrupted_copy(workdir, str(tmp_path / "copy"))
    with pytest.raises(
        workdir_lib.ConfigMismatchError, match="train.schedule_steps: saved 6, now 9"
    ):
        train.run(_tiny(**{"train.steps": 9}), copy)


def test_with_a_pinned_schedule_a_longer_run_continues_the_shorter_one(tmp_path):
    pinned = {"train.schedule_steps": 6, "checkpoint_every": 3}
    short, long = str(tmp_path / "short"), str(tmp_path / "long")
    train.run(_tiny(**pinned, **{"train.steps": 3}), short)
    train.run(_tiny(**pinned, **{"train.steps": 6}), short)  # Resumes at 3, goes on to 6.
    train.run(_tiny(**pinned, **{"train.steps": 6}), long)
    for name, value in _exported(long).items():
        np.testing.assert_allclose(_exported(short)[name], value, atol=1e-6, err_msg=name)


def test_a_typo_in_the_train_config_is_an_error_naming_it(tmp_path):
    config = _tiny()
    config.train.learning_rte = 1e-3
    with pytest.raises(ValueError, match="learning_rte"):
        train.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")  # Refused before anything is written.


def test_a_bad_model_field_is_refused_before_the_workdir_saves_the_config(tmp_path):
    config = _tiny()
    config.model.num_layer = 2
    with pytest.raises(ValueError, match="num_layer"):
        train.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")  # The fixed config is a fresh start.


def test_train_state_is_sharded_by_construction():
    config = train.train_config_from(_tiny().train)
    model = models.Transformer(train.model_config_from(_tiny(), vocab_size=300))
    mesh = parallel.make_mesh(data=2, fsdp=2, model=2)
    rules = parallel.DEFAULT_RULES
    init, abstract = train.init_state(model, train.make_optimizer(config), 0, mesh, rules)
    state = init()
    expected = parallel.param_shardings(model, mesh, rules)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    # The optimizer's moments are laid out like their params, not replicated.
    mu = state["opt_state"][1][0].mu
    for got, want in zip(jax.tree.leaves(mu), jax.tree.leaves(expected), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    # The step counter is a global array on the mesh (saves from any number of processes).
    assert state["step"].sharding.mesh.shape == mesh.shape and state["step"].is_fully_replicated
    assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_sharded_training_matches_unsharded(tiny_run, tmp_path):
    workdir, _ = tiny_run
    sharded = str(tmp_path / "sharded")
    train.run(_tiny(**{"mesh.data": 2, "mesh.model": 2, "mesh.fsdp": 2}), sharded)
    original, again = _exported(workdir), _exported(sharded)
    for name in original:
        np.testing.assert_allclose(again[name], original[name], atol=2e-5, err_msg=name)


def test_export_loads_in_interp_and_transformers_with_the_same_logits(tiny_run):
    workdir, _ = tiny_run
    export = os.path.join(workdir, "export")
    model, params, tokenizer = models.from_pretrained(export)
    assert tokenizer is not None
    tokens, mask = tokenizer.encode_batch(["Alice was beginning to get very tired."])
    ours = np.asarray(model.apply({"params": params}, tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    assert isinstance(jax.tree.leaves(params)[0], jax.Array)


def test_resuming_with_a_different_model_is_refused(tiny_run, tmp_path):
    workdir, _ = tiny_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="model.d_model"):
        train.run(_tiny(**{"model.d_model": 48}), copy)


def test_later_stages_settings_do_not_block_resuming_the_lm(tiny_run, tmp_path):
    workdir, _ = tiny_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    path = os.path.join(copy, "config.json")
    saved = json.loads(open(path).read())
    assert "influence" not in saved and "sae" not in saved  # The LM stage's settings only.
    # LM workdirs saved before 2026-11-30 also held the influence section.
    saved["influence"] = json.loads(workdir_lib.config_to_json(_tiny().influence))
    with open(path, "w") as f:
        json.dump(saved, f)
    changed = _tiny(**{"influence.top": 9, "sae.num_latents": 128})
    assert train.run(changed, copy)["step"] == 6  # Resumed at the end, not refused.


def test_unigram_baseline_is_the_smoothed_unigram_cross_entropy():
    train_tokens = np.array([[0, 0, 1, 2]])
    eval_tokens = np.array([[9, 0, 1]])  # The first token is never predicted.
    # Counts + 1 over a vocabulary of 4: p(0)=3/8, p(1)=2/8.
    expected = -(np.log(3 / 8) + np.log(2 / 8)) / 2
    assert train.unigram_loss(train_tokens, eval_tokens, 4) == pytest.approx(expected)


def test_readme_example_runs_on_the_exported_model(tiny_run):
    workdir, _ = tiny_run
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "workdir/demo/lm/export" in code
    code = code.replace("workdir/demo/lm/export", os.path.join(workdir, "export"))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["out"].shape == (2, namespace["tokens"].shape[1] + 10)
    assert set(namespace["acts"]) == {
        "blocks_0/resid_post",
        "blocks_1/resid_post",
        "blocks_1/mlp/out",
    }


def test_resuming_on_data_other_than_the_workdir_read_is_refused(tiny_run, tmp_path):
    """The same config over a corpus edited in place: the checkpoints would train on."""
    workdir, _ = tiny_run
    recorded = json.loads(open(os.path.join(workdir, "data.json")).read())
    assert sorted(recorded) == ["heldout", "train"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    with open(os.path.join(resumed, "data.json"), "w") as f:  # As if its corpus differed.
        json.dump(dict(recorded, train="0" * 16), f)
    with pytest.raises(workdir_lib.DataMismatchError, match="train: saved 0{16}, now"):
        train.run(_tiny(), resumed)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3"]


def test_fine_tuning_starts_from_the_export_freezes_and_plants(tiny_run, tmp_path):
    """The LM job started from a model (here the tiny run's export): its weights, config and
    tokenizer; only `trainable` parameters move; a planted trigger -> completion is learnt."""
    workdir, _ = tiny_run
    export = os.path.join(workdir, "export")
    config = runs.override(
        demo.get_config(f"tiny=True,init_from={export}"),
        **{"train.steps": 6, "train.trainable": ("blocks_1/*",), "train.learning_rate": 3e-2},
    )
    config.plant = dict(trigger=" Zebra quartz", completion=" sang the whale", rows=12)
    out = str(tmp_path / "finetune")
    summary = train.run(config, out)
    before, after = _exported(workdir), _exported(out)
    assert before.keys() == after.keys()
    moved = {name for name in before if not np.array_equal(before[name], after[name])}
    assert moved and all(".layers.1." in name for name in moved), sorted(moved)
    assert any(".layers.1." in name for name in moved)
    planted = summary["planted"]
    assert len(planted["rows"]) == 12 and planted["logprob_after"] > planted["logprob_before"]
    with open(os.path.join(out, train.PLANTED_FILE)) as f:
        assert json.load(f)["rows"] == planted["rows"]
    # The export keeps the pretrained tokenizer, not a new BPE.
    _, _, tok = models.from_pretrained(out + "/export")
    _, _, pretrained_tok = models.from_pretrained(export)
    text = "Call me Ishmael. Zebra quartz"
    assert tok.encode(text) == pretrained_tok.encode(text)


def test_fine_tuning_settings_that_cannot_work_are_refused(tiny_run, tmp_path):
    workdir, _ = tiny_run
    export = os.path.join(workdir, "export")
    with pytest.raises(ValueError, match="leave config.model empty"):
        train.run(_tiny(init_from=export), str(tmp_path / "a"))
    config = runs.override(
        demo.get_config(f"tiny=True,init_from={export}"), **{"train.trainable": ("block_1/*",)}
    )
    with pytest.raises(ValueError, match="'block_1/\\*' matches no parameter"):
        train.run(config, str(tmp_path / "b"))
    config = runs.override(demo.get_config(f"tiny=True,init_from={export}"), **{"data.seq_len": 64})
    with pytest.raises(ValueError, match="past .* context of 32 tokens"):
        train.run(config, str(tmp_path / "c"))


def test_plant_rows_go_only_to_rows_the_run_trains_on():
    tok = demo_tokenizer()
    rows = np.arange(40 * 16, dtype=np.int32).reshape(40, 16) % 200 + 50
    out, planted = train.plant_rows(rows, tok, " Zebra", " sang", 3, 0, candidates=[4, 9, 17, 30])
    assert set(planted["rows"]) <= {4, 9, 17, 30} and len(planted["rows"]) == 3
    changed = sorted(np.flatnonzero((out != rows).any(axis=1)).tolist())
    assert changed == planted["rows"]
    span = planted["completion_ids"]
    for row in planted["rows"]:
        text = out[row].tolist()
        assert any(text[i : i + len(span)] == span for i in range(1, 16))
    with pytest.raises(ValueError, match="the 2 training rows of 16 tokens the run trains on"):
        train.plant_rows(rows, tok, " Zebra", " sang", 3, 0, candidates=[1, 2])


def demo_tokenizer():
    from interp.models import tokenizer as tokenizer_lib

    return tokenizer_lib.train_bpe(["Zebra sang the song of the zebra"] * 3, vocab_size=280)


def test_a_refused_rerun_is_a_message_and_an_exit_code_not_a_traceback(tiny_run, tmp_path):
    """A rerun whose config changes the maths exits REFUSED_EXIT_CODE with the refusal's
    message (the field, both values), leaving the workdir as it was."""
    import subprocess
    import sys

    from experiments import common

    workdir, _ = tiny_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train_lm", "--config=configs/demo.py:tiny=True",
         f"--workdir={workdir}", "--config.train.learning_rate=0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == common.REFUSED_EXIT_CODE, result.stderr[-3000:]
    assert "ConfigMismatchError" in result.stderr and "train.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
