"""Helpers for tests that run experiments: config overrides and the real command line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override(config, **dotted):
    """Sets `config['a']['b'] = value` for each `a.b=value` (as --config.a.b=value would)."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def flags(**dotted) -> list[str]:
    """`--config.a.b=value` flags for `override`-style `a.b=value` pairs."""
    return [f"--config.{key}={value}" for key, value in dotted.items()]


def run_main(module: str, config: str, workdir: str, *extra: str, timeout: int = 900):
    """Runs `python -m module --config=... --workdir=... *extra` from the repo root; fails on
    error."""
    result = subprocess.run(
        [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result
