"""Tests for interp/experiment.py: the workdir's saved config and the resume check."""

import json

import ml_collections
import pytest
from etils import epath

from interp import experiment
from tests import runs


def _config(**overrides):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.log_every = 10
    c.model = dict(name="toy", d_model=64, dtype="bfloat16")
    c.train = dict(lr=3e-4, steps=500, betas=(0.9, 0.95))
    c.activation = lambda x: x  # Written as a string by to_json_best_effort.
    return runs.override(c, **overrides)


def test_writes_config_json(tmp_path):
    workdir = experiment.prepare_workdir(_config(), tmp_path / "run")
    assert isinstance(workdir, epath.Path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == {"name": "toy", "d_model": 64, "dtype": "bfloat16"}
    assert saved["train"]["betas"] == [0.9, 0.95]
    assert saved["activation"] == "function <lambda>"


def test_resuming_with_the_same_config_is_allowed(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    before = (tmp_path / "config.json").read_text()
    experiment.prepare_workdir(_config(), tmp_path)  # A new lambda: same JSON.
    assert (tmp_path / "config.json").read_text() == before


def test_resuming_with_more_steps_is_allowed_and_saved(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    experiment.prepare_workdir(_config(steps=2000, log_every=50, **{"train.steps": 900}), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["steps"], saved["log_every"], saved["train"]["steps"]) == (2000, 50, 900)


def test_mismatched_config_is_refused_with_the_differences(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    changed = _config(seed=1, steps=2000, **{"model.d_model": 128})
    with pytest.raises(experiment.ConfigMismatchError) as error:
        experiment.prepare_workdir(changed, tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "model.d_model: saved 64, now 128" in message
    assert "seed: saved 0, now 1" in message
    assert "steps: saved" not in message  # Allowed to change: not listed as a blocker.
    assert "overwrite_config=True" in message
    # Nothing was overwritten.
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


def test_added_field_is_a_mismatch(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    with pytest.raises(experiment.ConfigMismatchError, match="sae.k: saved '<absent>', now 32"):
        experiment.prepare_workdir(_config(sae=dict(k=32)), tmp_path)


def test_overwrite_config(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    experiment.prepare_workdir(_config(seed=7), tmp_path, overwrite_config=True)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7


def test_custom_resumable_fields(tmp_path):
    experiment.prepare_workdir(_config(), tmp_path)
    experiment.prepare_workdir(_config(seed=3), tmp_path, resumable_fields=("seed",))
    with pytest.raises(experiment.ConfigMismatchError):
        experiment.prepare_workdir(_config(steps=5), tmp_path, resumable_fields=("seed",))


def test_plain_dict_config(tmp_path):
    experiment.prepare_workdir({"a": 1, "b": {"c": (1, 2)}}, tmp_path)
    experiment.prepare_workdir({"a": 1, "b": {"c": [1, 2]}}, tmp_path)
    with pytest.raises(experiment.ConfigMismatchError, match="b.c"):
        experiment.prepare_workdir({"a": 1, "b": {"c": [1, 3]}}, tmp_path)


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        experiment.prepare_workdir(_config(), tmp_path)


def test_gcs_workdir(gcs_bucket):
    workdir = f"{gcs_bucket}/runs/a"
    assert str(experiment.prepare_workdir(_config(), workdir)) == workdir
    assert json.loads((epath.Path(workdir) / "config.json").read_text())["seed"] == 0
    experiment.prepare_workdir(_config(steps=3), workdir)
    with pytest.raises(experiment.ConfigMismatchError, match="seed: saved 0, now 1"):
        experiment.prepare_workdir(_config(seed=1), workdir)


def test_a_relative_workdir_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = experiment.prepare_workdir(_config(), "runs/a")
    assert workdir.is_absolute() and workdir == epath.Path(tmp_path / "runs" / "a")
