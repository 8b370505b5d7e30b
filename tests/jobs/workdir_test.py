"""Tests for interp/jobs/workdir.py: the workdir's saved config and the resume check."""

import json

import ml_collections
import pytest
from etils import epath

from interp.jobs import workdir as workdir_lib
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


def _started(config, workdir, **kwargs):
    """`prepare_workdir`, then a file standing for the run's work (checkpoints, metrics): a
    workdir holding only its config.json takes a new one (test_a_config_alone_is_replaced)."""
    path = workdir_lib.prepare_workdir(config, workdir, **kwargs)
    (path / "metrics.jsonl").write_text("{}\n")
    return path


def test_writes_config_json(tmp_path):
    workdir = workdir_lib.prepare_workdir(_config(), tmp_path / "run")
    assert isinstance(workdir, epath.Path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == {"name": "toy", "d_model": 64, "dtype": "bfloat16"}
    assert saved["train"]["betas"] == [0.9, 0.95]
    assert saved["activation"] == "function <lambda>"


def test_resuming_with_the_same_config_is_allowed(tmp_path):
    workdir_lib.prepare_workdir(_config(), tmp_path)
    before = (tmp_path / "config.json").read_text()
    workdir_lib.prepare_workdir(_config(), tmp_path)  # A new lambda: same JSON.
    assert (tmp_path / "config.json").read_text() == before


def test_layout_and_reporting_may_change_on_resume_and_are_saved(tmp_path):
    workdir_lib.prepare_workdir(_config(mesh=dict(data=-1, model=1), rules=()), tmp_path)
    workdir_lib.prepare_workdir(_config(log_every=50, mesh=dict(data=2, model=4),
                                       rules=(("batch", "data"),)), tmp_path)  # fmt: skip
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["log_every"], saved["mesh"]) == (50, {"data": 2, "model": 4})
    assert saved["rules"] == [["batch", "data"]]


def _pinned(config):
    length = config.train.schedule_steps or config.train.steps
    return workdir_lib.pin_schedule(config, "train", length)


def test_the_schedule_length_is_saved_resolved(tmp_path):
    workdir_lib.prepare_workdir(_pinned(_config(**{"train.schedule_steps": 0})), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["schedule_steps"] == saved["train"]["steps"] == 500


def test_more_steps_stretching_the_schedule_are_refused_with_a_hint(tmp_path):
    _started(_pinned(_config(**{"train.schedule_steps": 0})), tmp_path)
    longer = _pinned(_config(**{"train.steps": 900, "train.schedule_steps": 0}))
    with pytest.raises(workdir_lib.ConfigMismatchError) as error:
        workdir_lib.prepare_workdir(longer, tmp_path)
    assert "train.schedule_steps: saved 500, now 900" in str(error.value)
    assert "train.steps" not in str(error.value).split("Fields that")[0]  # Not a blocker.
    assert "schedule_steps=N" in str(error.value)


def test_more_steps_along_the_saved_schedule_are_allowed(tmp_path):
    workdir_lib.prepare_workdir(_pinned(_config(**{"train.schedule_steps": 0})), tmp_path)
    # Given explicitly, or as 0 with the same number of steps: the same schedule.
    workdir_lib.prepare_workdir(_pinned(_config(**{"train.schedule_steps": 500})), tmp_path)
    longer = _pinned(_config(**{"train.steps": 900, "train.schedule_steps": 500}))
    workdir_lib.prepare_workdir(longer, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["train"]["steps"], saved["train"]["schedule_steps"]) == (900, 500)


def test_pin_schedule_copies_and_can_add_the_field():
    config = _config()  # Its train section has no schedule_steps.
    config.lock()
    pinned = workdir_lib.pin_schedule(config, "train", 500)
    assert pinned.train.schedule_steps == 500 and "schedule_steps" not in config.train


def test_resumable_names_match_whole_dotted_parts():
    assert workdir_lib._is_resumable("mesh.data", ["mesh"])
    assert workdir_lib._is_resumable("sae.train.log_every", ["log_every"])
    assert workdir_lib._is_resumable("sae.train.steps", ["sae.train.steps"])
    assert not workdir_lib._is_resumable("train.steps", ["sae.train.steps"])
    assert not workdir_lib._is_resumable("meshes", ["mesh"])
    assert not workdir_lib._is_resumable("model.mesh_size", ["mesh"])


def test_mismatched_config_is_refused_with_the_differences(tmp_path):
    _started(_config(), tmp_path)
    changed = _config(seed=1, log_every=20, **{"model.d_model": 128})
    with pytest.raises(workdir_lib.ConfigMismatchError) as error:
        workdir_lib.prepare_workdir(changed, tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "model.d_model: saved 64, now 128" in message
    assert "seed: saved 0, now 1" in message
    assert "log_every" not in message.split("Fields that")[0]  # Allowed: not a blocker.
    assert "overwrite_config=True" in message
    # Nothing was overwritten.
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


def test_added_field_is_a_mismatch(tmp_path):
    _started(_config(), tmp_path)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="sae.k: saved '<absent>', now 32"):
        workdir_lib.prepare_workdir(_config(sae=dict(k=32)), tmp_path)


def test_fields_added_later_read_as_their_backward_compatible_value(tmp_path):
    # A workdir saved before config.data had the streaming fields resumes under the new demo
    # config (the demo's own data section), but not when a field asks for something else.
    from configs import demo

    data = dict(demo.get_config().data)
    added = [field.split(".")[1] for field in workdir_lib.ADDED_FIELDS]
    old = {k: v for k, v in data.items() if k not in added}
    assert len(old) < len(data)  # The demo config has the added fields.
    _started(_config(data=old), tmp_path)
    workdir_lib.prepare_workdir(_config(data=data), tmp_path)  # Resumes, nothing rewritten.
    assert "prepend_bos" not in json.loads((tmp_path / "config.json").read_text())["data"]
    with pytest.raises(workdir_lib.ConfigMismatchError, match="saved 'tokenizer', now 'always'"):
        workdir_lib.prepare_workdir(_config(data=dict(data, prepend_bos="always")), tmp_path)


def test_retired_fields_saved_by_earlier_versions_are_no_difference(tmp_path):
    _started(_config(old=dict(a=1)), tmp_path)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="old.a: saved 1, now '<absent>'"):
        workdir_lib.prepare_workdir(_config(), tmp_path)
    workdir_lib.prepare_workdir(_config(), tmp_path, retired_fields=("old",))
    # Only absent ones: a retired field the config still has is checked as any other.
    with pytest.raises(workdir_lib.ConfigMismatchError, match="old.a: saved 1, now 2"):
        workdir_lib.prepare_workdir(_config(old=dict(a=2)), tmp_path, retired_fields=("old",))


def test_overwrite_config(tmp_path):
    workdir_lib.prepare_workdir(_config(), tmp_path)
    workdir_lib.prepare_workdir(_config(seed=7), tmp_path, overwrite_config=True)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7


def test_custom_resumable_fields(tmp_path):
    _started(_config(), tmp_path)
    workdir_lib.prepare_workdir(_config(seed=3), tmp_path, resumable_fields=("seed",))
    with pytest.raises(workdir_lib.ConfigMismatchError):
        workdir_lib.prepare_workdir(_config(log_every=5), tmp_path, resumable_fields=("seed",))


def test_plain_dict_config(tmp_path):
    _started({"a": 1, "b": {"c": (1, 2)}}, tmp_path)
    workdir_lib.prepare_workdir({"a": 1, "b": {"c": [1, 2]}}, tmp_path)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="b.c"):
        workdir_lib.prepare_workdir({"a": 1, "b": {"c": [1, 3]}}, tmp_path)


def test_a_flag_and_a_number_differ(tmp_path):
    _started({"a": 1, "b": 1.0}, tmp_path)
    workdir_lib.prepare_workdir({"a": 1.0, "b": 1}, tmp_path)  # JSON numbers: the same.
    with pytest.raises(workdir_lib.ConfigMismatchError, match="a: saved 1, now True"):
        workdir_lib.prepare_workdir({"a": True, "b": 1}, tmp_path)


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        workdir_lib.prepare_workdir(_config(), tmp_path)


def test_gcs_workdir(gcs_bucket):
    workdir = f"{gcs_bucket}/runs/a"
    assert str(_started(_config(), workdir)) == workdir
    assert json.loads((epath.Path(workdir) / "config.json").read_text())["seed"] == 0
    workdir_lib.prepare_workdir(_config(log_every=3), workdir)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="seed: saved 0, now 1"):
        workdir_lib.prepare_workdir(_config(seed=1), workdir)


def test_a_relative_workdir_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = workdir_lib.prepare_workdir(_config(), "runs/a")
    assert workdir.is_absolute() and workdir == epath.Path(tmp_path / "runs" / "a")


def test_a_config_alone_is_replaced(tmp_path, gcs_bucket):
    # A run that saved its config and failed before writing anything (a mistyped model or
    # data path) must not lock the workdir: the corrected command replaces the config.
    for workdir in (tmp_path / "run", f"{gcs_bucket}/run"):
        workdir_lib.prepare_workdir(_config(**{"model.name": "typo"}), workdir)
        workdir_lib.prepare_workdir(_config(), workdir)
        saved = json.loads((epath.Path(workdir) / "config.json").read_text())
        assert saved["model"]["name"] == "toy"
        (epath.Path(workdir) / "checkpoints").mkdir()  # Work: the config is now the run's.
        (epath.Path(workdir) / "checkpoints" / "1").write_text("")
        with pytest.raises(workdir_lib.ConfigMismatchError, match="saved 'toy', now 'other'"):
            workdir_lib.prepare_workdir(_config(**{"model.name": "other"}), workdir)


def test_a_missing_bucket_is_named(gcs_bucket):
    missing = gcs_bucket.replace("gs://t-", "gs://t-missing-")
    with pytest.raises(FileNotFoundError, match=f"The bucket {missing} of the workdir .* does not"):
        workdir_lib.prepare_workdir(_config(), f"{missing}/runs/a")


def test_a_resume_that_reads_other_data_is_refused(tmp_path):
    # The same config over a corpus file edited in place: only the data record differs.
    workdir = workdir_lib.prepare_workdir(_config(), tmp_path / "run")
    workdir_lib.check_data(workdir, {"train": "a" * 16, "stream": None})
    workdir_lib.check_data(workdir, {"train": "a" * 16, "heldout": "c" * 16})  # Same; more.
    assert json.loads((workdir / "data.json").read_text()) == {"train": "a" * 16,
                                                               "heldout": "c" * 16}  # fmt: skip
    # Nothing but the config and this record: a run that wrote nothing, replaced.
    workdir_lib.check_data(workdir, {"train": "b" * 16})
    (workdir / "checkpoints").mkdir()  # Work: now it is the run's data.
    with pytest.raises(workdir_lib.DataMismatchError,
                       match=f"(?s)read other data.*train: saved {'b' * 16}, now {'d' * 16}.*"
                       "new workdir"):  # fmt: skip
        workdir_lib.check_data(workdir, {"train": "d" * 16, "stream": None})
    # Data no record covers (a stream, unfingerprinted) is not checked.
    workdir_lib.check_data(workdir, {"train": "b" * 16, "stream": None})


def test_stage_model_path_reads_what_each_stage_studied(tmp_path):
    """The SmolLM2 demo's layout: lm fine-tunes the base, sae/analysis/steer read the base,
    influence ('') the fine-tune; a Hub id comes back at the commit its run recorded."""
    stages = {
        "sae": {"sae": {"model_path": "embedded:smollm2"}},
        "analysis": {"analysis": {"model_path": "embedded:smollm2"}, "sae": {"model_path": ""}},
        "steer": {"steering": {"model_path": "org/base"}, "sae": {"model_path": "x"}},
        "influence": {"influence": {"model_path": ""}},
    }
    for name, config in stages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    export = str(tmp_path / "lm" / "export")
    assert workdir_lib.stage_model_path(tmp_path, "lm") == export
    assert workdir_lib.stage_model_path(tmp_path, "sae") == "embedded:smollm2"
    assert workdir_lib.stage_model_path(tmp_path, "analysis") == "embedded:smollm2"
    assert workdir_lib.stage_model_path(tmp_path, "influence") == export
    assert workdir_lib.stage_model_path(tmp_path, "steer") == "org/base"  # Nothing recorded.
    (tmp_path / "steer" / "data.json").write_text(json.dumps({"model": "org/base@abc123"}))
    assert workdir_lib.stage_model_path(tmp_path, "steer") == "org/base@abc123"
    with pytest.raises(FileNotFoundError, match="'lmx' stage has not run"):
        workdir_lib.stage_model_path(tmp_path, "lmx")
