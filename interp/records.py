"""Frozen-dataclass configs (ModelConfig, SAEConfig): building them strictly from dicts."""

import dataclasses
from typing import Any


def from_dict(cls: type, values: Any, where: str | None = None):
    """`cls(**values)` for a dict or ConfigDict, naming any field `cls` does not have.

    A typo in a config (`num_latent=...`) would otherwise fail with Python's terse
    "unexpected keyword argument", or, for configs read with defaults, not at all. `where`
    names the config section in the message (`config.sae.train`).
    """
    values = dict(values)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} field(s) {unknown}"
            + (f" in {where}" if where else "")
            + f"; valid fields are {sorted(known)}."
        )
    return cls(**values)
