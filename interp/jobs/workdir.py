"""A job's workdir and the config saved in it: resuming means the same maths.

    def run(config, workdir):
        workdir = workdir_lib.prepare_workdir(config, workdir)  # Refuses a changed config.
        state, summary = loop.train(task, workdir, loop_config, ...)

A workdir that already holds a `config.json` is a run being resumed. The resumed run must
compute what the uninterrupted one would have, so only fields that change how a run is laid
out or reported may differ (`RESUMABLE_FIELDS`): the mesh and the sharding rules (orbax
restores a checkpoint into any sharding), how often it logs, evaluates and saves, and how many
checkpoints it keeps, and `steps`, where it ends: every learning-rate schedule has its own
length field (`schedule_steps`, 0 meaning "as long as `steps`"), which the jobs save resolved
(`pin_schedule`), so a run continued to more steps walks the schedule it started on, while a
change that would stretch the schedule shows up, and is refused, as a new `schedule_steps`.
"""

from __future__ import annotations

import json
import logging as std_logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from interp import parallel, paths
from interp.jobs import lock
from interp.models import hub, pretrained

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # What the run read: {name: data fingerprint} (`check_data`).

# Fields that may differ when resuming: they change where arrays live or how often a run
# reports, not what it computes. A name matches a dotted field that is it, ends with it, or
# lies under it ('mesh' matches 'mesh.data'; 'log_every' matches 'sae.train.log_every').
RESUMABLE_FIELDS = (
    "steps",  # Where a run ends; the schedule's length is saved apart (pin_schedule).
    "mesh",
    "rules",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "harvest_commit_seconds",  # How often a harvest commits its progress, not what it writes.
)

# Fields added to the job configs after workdirs had saved theirs, each with the value that
# computes what runs without it computed: a saved config lacking one reads as having that
# value, so adding a backward-compatible field does not make every older workdir unresumable.
# (A field added with another meaning is a real difference; leave it out of here.)
ADDED_FIELDS = {
    "data.text_field": "text",  # Streamed columnar sources (issue 12); .txt/.jsonl unchanged.
    "data.split": "",
    "data.prepend_bos": "tokenizer",  # What `pack` did before the setting existed.
}

_ABSENT = "<absent>"
# to_json_best_effort writes unserializable objects as their repr, which may hold an address.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ConfigMismatchError(ValueError):
    """The workdir holds a run whose config differs from the one given."""


class DataMismatchError(ValueError):
    """The workdir holds a run of the same config that read other data."""


def config_to_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """The config as indented, key-sorted JSON (unserializable values as strings)."""
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    return json.dumps(config, indent=2, sort_keys=True, default=repr) + "\n"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} for nested dicts; lists and other values are leaves."""
    if isinstance(tree, Mapping) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, str):
        tree = _ADDRESS.sub("", tree)
    return {prefix[:-1]: tree}


def _is_resumable(field: str, resumable: Iterable[str]) -> bool:
    """Whether a dotted field is, ends with, or lies under a name of the allow-list."""
    dotted = f".{field}."
    return any(f".{name}." in dotted for name in resumable)


def pin_schedule(
    config: ml_collections.ConfigDict, train_field: str, schedule_length: int
) -> ml_collections.ConfigDict:
    """A copy of `config` whose `<train_field>.schedule_steps` is the resolved length.

    `schedule_steps: 0` means "as long as `steps`"; saved as such, a resume with more steps
    would silently stretch the schedule. Saved resolved, the same resume keeps the schedule
    when `schedule_steps` is given, and shows up as a changed `schedule_steps` (refused)
    when it follows `steps`.
    """
    pinned = ml_collections.ConfigDict(config.to_dict())
    node = pinned
    for part in train_field.split("."):
        node = node[part]
    node["schedule_steps"] = int(schedule_length)
    return pinned


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every differing leaf, by dotted name.

    Both configs are compared as JSON would hold them: tuples equal lists, `1` equals `1.0`.
    A field present on one side only has the value '<absent>' on the other, except fields of
    `ADDED_FIELDS` missing from `saved`, which read as their backward-compatible value.
    """
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    for field, value in ADDED_FIELDS.items():
        if field in current_flat and field not in saved_flat:
            saved_flat[field] = value
    differences = []
    for field in sorted(saved_flat.keys() | current_flat.keys()):
        old = saved_flat.get(field, _ABSENT)
        new = current_flat.get(field, _ABSENT)
        # `True == 1` in Python; in a config a flag and a number are different settings.
        if old != new or isinstance(old, bool) != isinstance(new, bool):
            differences.append((field, old, new))
    return differences


def prepare_workdir(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: epath.PathLike,
    *,
    overwrite_config: bool = False,
    resumable_fields: Iterable[str] = RESUMABLE_FIELDS,
    retired_fields: Iterable[str] = (),
) -> epath.Path:
    """Creates `workdir` and saves `config` there as `config.json`, checking it on resume.

    A workdir that already holds a `config.json` is a run being resumed. Resuming with a
    different config (a changed model width, a new seed) silently mixes two experiments, so
    that is refused unless only `resumable_fields` changed (then the new config replaces the
    saved one), or `overwrite_config` is set, or the workdir holds nothing but the config
    (a run that failed before writing anything, e.g. on a mistyped model path: the
    corrected command replaces its config, with a warning listing the differences).

    In multi-process runs process 0 checks and writes while the others wait for it
    (`parallel.on_main_process`): a process that looked after process 0 wrote would see
    another workdir than it did. A refused config is raised on process 0 as
    `ConfigMismatchError`, on the others as a `RuntimeError` pointing to process 0's log.

    Args:
      config: The run's config (an `ml_collections.ConfigDict` or a plain mapping).
      workdir: Local path or `gs://bucket/path`.
      overwrite_config: Replace a differing saved config instead of refusing (logs the
        differences). Only for when you know the checkpoints still fit the new config.
      resumable_fields: Fields allowed to differ on resume: a dotted name (`train.steps`),
        a last part (`log_every`) or a subtree (`mesh`).
      retired_fields: Fields (named as `resumable_fields`) that earlier versions of the job
        saved but it no longer depends on: saved, and absent from `config`, they are not a
        difference (the saved file keeps them until something else changes).

    Returns:
      The workdir as an `epath.Path`.

    Raises:
      ConfigMismatchError: If the saved config differs in other fields.
      ValueError: If the saved `config.json` is not valid JSON.
    """
    workdir = paths.resolve(workdir)  # Local paths absolute: orbax refuses relative ones.
    text = config_to_json(config)
    parallel.on_main_process(
        _check_and_save_config, workdir, text, overwrite_config, tuple(resumable_fields),
        tuple(retired_fields),
    )  # fmt: skip
    return workdir


def _check_and_save_config(
    workdir: epath.Path,
    text: str,
    overwrite_config: bool,
    resumable_fields: tuple[str, ...],
    retired_fields: tuple[str, ...],
) -> None:
    """`prepare_workdir`'s work, on one process."""
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); move it away to start.") from e
        differences = [
            (field, old, new)
            for field, old, new in config_differences(saved, json.loads(text))
            if not (new == _ABSENT and _is_resumable(field, retired_fields))
        ]
        blocking = [d for d in differences if not _is_resumable(d[0], resumable_fields)]
        listing = "\n".join(
            f"  {field}: saved {old!r}, now {new!r}"
            for field, old, new in (blocking or differences)
        )
        if blocking and not overwrite_config and not _holds_only_config(workdir):
            hint = ""
            if any(field.endswith("schedule_steps") for field, _, _ in blocking):
                hint = (
                    "\nA new `steps` with schedule_steps=0 would stretch the learning-rate "
                    "schedule; to train on along the saved one, also pass its saved "
                    "schedule_steps (e.g. --config.train.schedule_steps=N)."
                )
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config ({path}):\n{listing}\n"
                "Resume with the saved config or choose a new workdir (from Python, "
                "overwrite_config=True if the checkpoints still fit the new config). Fields "
                f"that may change on resume: {', '.join(resumable_fields)}.{hint}"
            )
        if blocking and not overwrite_config:
            logging.warning(
                "Replacing the config of %s, which holds no other file (the run that saved "
                "it stopped before writing anything); differences:\n%s",
                workdir,
                listing,
            )
        elif blocking:
            logging.warning("Overwriting the config in %s; differences:\n%s", path, listing)
        elif differences:
            logging.info("Resuming %s with changed fields:\n%s", workdir, listing)
        else:
            logging.info("Resuming %s with the same config.", workdir)
        if not differences:
            return
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths.write_text(path, text)  # Atomic: a temporary file and a rename locally.
    except FileNotFoundError as error:
        # gcsfs names only the upload URL. Checked only now: reading a bucket's own metadata
        # takes a permission (storage.buckets.get) that writing objects does not.
        bucket = f"gs://{str(workdir).split('/')[2]}"
        if paths.scheme(workdir) != "gs" or epath.Path(bucket).exists():
            raise
        raise FileNotFoundError(
            f"The bucket {bucket} of the workdir {workdir} does not exist, or these "
            f"credentials cannot see it: create it (gcloud storage buckets create {bucket}) "
            "or correct the name."
        ) from error
    logging.info("Config saved to %s.", path)  # Its file only: the console stays readable.


def _holds_only_config(workdir: epath.Path) -> bool:
    """Whether `workdir` holds its `config.json` and nothing else: a run that saved its config
    and then failed (a typo in a model or data path) before writing any work, whose config a
    corrected rerun replaces instead of refusing (its data record and the job's own lock are no
    work)."""
    return all(
        entry.name in (CONFIG_FILE, DATA_FILE, lock.LOCK_FILE) for entry in workdir.iterdir()
    )


def check_data(workdir: epath.PathLike, fingerprints: Mapping[str, str | None]) -> None:
    """Records what a run reads in `workdir/data.json`; refuses a resume that reads other data.

    The saved config names the data (a corpus path, a seed), not what it holds: a corpus file
    edited at the same path would be read by a resumed run as if it were the same, its
    checkpoints continuing on other text. So a job also records the fingerprint of what it
    read (`interp.data.fingerprint`), and a later run on the workdir must read the same.

    Args:
      workdir: The job's workdir (after `prepare_workdir`).
      fingerprints: {what: fingerprint}, e.g. {'train': ..., 'heldout': ...}; None for data
        that cannot be fingerprinted cheaply (a streamed source), which is not checked.

    Raises:
      DataMismatchError: If the workdir recorded another fingerprint for one of them and
        holds more than its config and this record (a run that wrote nothing is replaced).
    """
    record = {k: v for k, v in fingerprints.items() if v is not None}
    parallel.on_main_process(_check_and_save_data, paths.resolve(workdir), record)


def _check_and_save_data(workdir: epath.Path, record: dict[str, str]) -> None:
    """`check_data`'s work, on one process."""
    path = workdir / DATA_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    changed = {k: (saved[k], v) for k, v in record.items() if k in saved and saved[k] != v}
    if changed and not _holds_only_config(workdir):
        listing = "\n".join(f"  {k}: saved {old}, now {new}" for k, (old, new) in changed.items())
        raise DataMismatchError(
            f"{workdir} holds a run that read other data than this one, with the same config "
            f"({path}):\n{listing}\nThe data at the configured path changed since (a corpus "
            "file edited or replaced in place?): resuming would continue its checkpoints on "
            "other data. Restore the data it read, or use a new workdir (or delete this one)."
        )
    if {**saved, **record} != saved:
        paths.write_text(path, json.dumps({**saved, **record}, indent=1, sort_keys=True) + "\n")


# Libraries whose INFO lines (a dozen per checkpoint for orbax) bury the progress line.
_CHATTY = ("/orbax/", "/jax/_src/", "/tensorstore/")


def _drop_library_info(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _CHATTY
    )


def quiet_library_logs() -> None:
    """Hides INFO logs of orbax and JAX internals (warnings and errors still show).

    Experiment mains call this so the progress line and the run's own messages stay legible.
    """
    absl_logger = std_logging.getLogger("absl")
    if _drop_library_info not in absl_logger.filters:
        absl_logger.addFilter(_drop_library_info)


def subconfig(
    config: ml_collections.ConfigDict, *, keep=None, drop=()
) -> ml_collections.ConfigDict:
    """The part of a pipeline config one stage depends on (what its workdir saves and checks).

    A pipeline config holds every stage's settings; checking all of them on resume would make
    a change to a later stage (say the SAE widths) block resuming an earlier one.
    """
    keys = [k for k in config.keys() if (keep is None or k in keep) and k not in drop]
    return ml_collections.ConfigDict({k: config[k] for k in keys})


def stage(pipeline_workdir: epath.PathLike, name: str) -> str:
    """Where a pipeline stage writes: `<pipeline workdir>/<name>` (local or gs://)."""
    return str(paths.resolve(pipeline_workdir) / name)


# The config section of a stage whose folder is named otherwise (each reads `model_path` there).
_STAGE_SECTIONS = {"steer": "steering"}


def stage_model_path(pipeline_workdir: epath.PathLike, name: str) -> str:
    """The model a pipeline stage studied, as `from_pretrained` takes it.

    Stages may study different models: in the SmolLM2 demo the LM stage fine-tunes
    'embedded:smollm2' while the SAE, analysis and steering stages read the base model and
    influence the fine-tune. A stage's saved `config.json` says which (its section's
    `model_path`; '' is the pipeline's LM, `<pipeline workdir>/lm/export`), so code reading a
    stage's results (its SAE, its feature statistics) loads the model they belong to.

        model, params, tokenizer = from_pretrained(stage_model_path("workdir/demo", "steer"))

    Args:
      pipeline_workdir: The pipeline's workdir (local or gs://).
      name: The stage's folder: 'lm' (its export), 'sae', 'influence', 'analysis' or 'steer'.

    Returns:
      The stage's `model_path`, or the pipeline LM's export folder for ''; a Hub id with the
      commit the stage's run loaded ('org/name@<commit>', from its `data.json`).

    Raises:
      FileNotFoundError: if the stage has not saved its config (it has not run).
    """
    workdir = paths.resolve(pipeline_workdir)
    export = str(workdir / "lm" / "export")
    if name == "lm":
        return export
    path = workdir / name / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the pipeline's {name!r} stage has not run in "
            f"{workdir} (stages: lm, sae, influence, analysis, steer)."
        )
    section = json.loads(path.read_text()).get(_STAGE_SECTIONS.get(name, name)) or {}
    model_path = section.get("model_path") or ""
    if not model_path:
        return export
    if hub.is_hub_id(model_path):  # The commit `load_model` pinned on the stage's first run.
        record = workdir / name / DATA_FILE
        loaded = json.loads(record.read_text()).get("model", "") if record.exists() else ""
        if loaded.startswith(f"{hub.split_revision(model_path)[0]}@"):
            return loaded
    return model_path


def load_model(workdir: epath.PathLike, model_path: str, *, job: str) -> tuple[Any, Any, Any]:
    """`from_pretrained(model_path)` for a job, with a Hub id pinned to one commit.

    A Hub id ('org/name', 'org/name@branch') names a revision that can move; the commit it
    resolves to on the first run is recorded in `workdir/data.json` ('model'), and a rerun on
    the workdir loads that commit, so a resumed run continues on the weights it started on.
    Folders and GGUF files load as they are.

    Args:
      workdir: The job's workdir (after `prepare_workdir`).
      model_path: A Hugging Face folder, GGUF file or Hub id.
      job: For the error message, e.g. 'the SAE job'.

    Returns:
      (Transformer, params, tokenizer), as `from_pretrained`.

    Raises:
      FileNotFoundError: If the model has no tokenizer (every job reads or writes text).
      DataMismatchError: If the workdir's run read another Hub model.
    """
    source = model_path
    if hub.is_hub_id(model_path):
        repo_id, revision = hub.split_revision(model_path)
        path = paths.resolve(workdir) / DATA_FILE
        saved = json.loads(path.read_text()).get("model", "") if path.exists() else ""
        if saved.startswith(f"{repo_id}@") and revision is None:
            revision = saved.split("@", 1)[1]  # The commit the first run resolved.
        resolved = hub.resolve(repo_id, revision)
        check_data(workdir, {"model": f"{repo_id}@{resolved.revision}"})
        source = resolved.path
    model, params, tokenizer = pretrained.from_pretrained(source)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{model_path} has no tokenizer (tokenizer.json, or a GGUF file's tokenizer "
            f"metadata); {job} needs it."
        )
    return model, params, tokenizer
