"""Fitted factors on disk (local or gs://): one safetensors file of arrays and a JSON record.

    influence.save_factors("gs://b/run/factors", factors)
    factors = influence.load_factors("gs://b/run/factors")

Scores go to zarr arrays through tensorstore (`save_scores` / `load_scores`), so a large
[queries, training sequences] matrix can be written and read in parts, locally or on gs://.

Layout: `factors.safetensors` ('<module>/<array>' -> float32) is written first, `factors.json`
(strategy, modules, counts, model and data fingerprints) last and atomically, so a folder with
a JSON record holds complete arrays.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorstore as ts

from interp import paths, safetensors_io
from interp.influence.factors import Factors
from interp.influence.gradients import TrackedModule

ARRAYS_FILE = "factors.safetensors"
RECORD_FILE = "factors.json"
FORMAT = "interp.influence.factors"
VERSION = 1


def save_factors(path: paths.PathLike, factors: Factors) -> None:
    """Writes `factors` to a folder (created if needed; an existing record is replaced)."""
    folder = paths.resolve(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}/{key}": np.asarray(value, np.float32)
        for name, values in factors.arrays.items()
        for key, value in values.items()
    }
    safetensors_io.write(folder / ARRAYS_FILE, tensors)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "strategy": factors.strategy,
        "modules": [dataclasses.asdict(m) for m in factors.modules],
        "num_tokens": factors.num_tokens,
        "num_sequences": factors.num_sequences,
        "model_fingerprint": factors.model_fingerprint,
        "sample_labels": factors.sample_labels,
        "num_batches": factors.num_batches,
        "data_fingerprint": factors.data_fingerprint,
    }
    paths.write_text(folder / RECORD_FILE, json.dumps(record, indent=1) + "\n")


def load_factors(path: paths.PathLike) -> Factors:
    """Reads a folder written by `save_factors`.

    Raises:
      FileNotFoundError: If the folder holds no complete factors (no `factors.json`).
      ValueError: For a record of another format or version, or arrays that do not match it.
    """
    folder = paths.resolve(path)
    if not (folder / RECORD_FILE).exists():
        raise FileNotFoundError(
            f"No fitted factors in {folder}: {RECORD_FILE} is missing (an interrupted save "
            "leaves none); fit them again (influence.fit_factors) and save_factors."
        )
    record = json.loads((folder / RECORD_FILE).read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(
            f"{folder / RECORD_FILE} is not a version-{VERSION} {FORMAT} record "
            f"(format {record.get('format')!r}, version {record.get('version')!r})."
        )
    modules = tuple(
        TrackedModule(
            **{
                **m,
                "kernel": tuple(m["kernel"]),
                "bias": None if m["bias"] is None else tuple(m["bias"]),
            }
        )  # fmt: skip
        for m in record["modules"]
    )
    tensors = safetensors_io.read(folder / ARRAYS_FILE)
    arrays: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in modules}
    for key, value in tensors.items():
        name, _, array = key.rpartition("/")
        if name not in arrays:
            raise ValueError(f"{folder / ARRAYS_FILE} holds {key!r}, not a module of the record.")
        arrays[name][array] = np.array(value, np.float32)
    return Factors(
        strategy=record["strategy"],
        modules=modules,
        arrays=arrays,
        num_tokens=record["num_tokens"],
        num_sequences=record["num_sequences"],
        model_fingerprint=record["model_fingerprint"],
        sample_labels=record["sample_labels"],
        # Absent from records saved before factors recorded their data.
        num_batches=record.get("num_batches", 0),
        data_fingerprint=record.get("data_fingerprint", ""),
    )


def save_scores(path: paths.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Writes each array as a zarr v3 array `<path>/<name>/` (float32 or int64 as given)."""
    base = paths.kvstore(path, "Influence scores")
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        spec = {"driver": "zarr3", "kvstore": dict(base, path=base["path"] + f"{name}/")}
        store = ts.open(spec, create=True, delete_existing=True, dtype=array.dtype.name,
                        shape=array.shape).result()  # fmt: skip
        store.write(array).result()


def load_scores(path: paths.PathLike, name: str) -> np.ndarray:
    """Reads the array `name` written by `save_scores`.

    Raises:
      FileNotFoundError: If `<path>/<name>` holds no array.
    """
    base = paths.kvstore(path, "Influence scores")
    spec = {"driver": "zarr3", "kvstore": dict(base, path=base["path"] + f"{name}/")}
    try:
        store = ts.open(spec, open=True, read=True).result()
    except ValueError as error:
        raise FileNotFoundError(f"No scores array {name!r} under {path}: {error}") from None
    return store.read().result()
