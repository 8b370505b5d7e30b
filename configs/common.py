"""Helpers shared by config files."""

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses the `:key=value,key=value` suffix of `--config=configs/x.py:...`.

    Values are Python literals where they parse (`tiny=True`, `layer=3`), else strings. Keys
    must be among `defaults`, so a typo is an error rather than a silently ignored option.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        out[key] = value
    return out
