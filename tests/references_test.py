"""Tests for tests/references.py: a missing reference skips, except under CI=true."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import references, runs

MISSING = "interp_no_such_reference"  # A module name nothing provides.
HINT = "pip install interp-no-such-reference"


@pytest.fixture(params=["true", None], ids=["ci", "local"])
def ci(request, monkeypatch):
    """Runs the test once with CI=true and once with CI unset; the value is whether in CI."""
    if request.param is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", request.param)
    return request.param is not None


def _outcome(ci):
    """What a missing reference must raise: pytest's fail under CI, its skip otherwise."""
    return pytest.fail.Exception if ci else pytest.skip.Exception


@pytest.mark.parametrize("value", ["false", "1", ""])
def test_only_ci_true_counts_as_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert not references.in_ci()
    with pytest.raises(pytest.skip.Exception, match="the reason"):
        references.skip_or_fail("the reason")


def test_skip_or_fail(ci):
    assert references.in_ci() == ci
    with pytest.raises(_outcome(ci), match="the reason") as raised:
        references.skip_or_fail("the reason")
    assert ("CI=true" in str(raised.value)) == ci  # The failure says why it is not a skip.


def test_require_module(ci):
    assert references.require_module("json", HINT) is json  # Present: no skip, even in CI.
    with pytest.raises(_outcome(ci), match=f"{MISSING} does not import.*{HINT}"):
        references.require_module(MISSING, HINT)
    # A submodule of a package that is present, but not the submodule itself.
    with pytest.raises(_outcome(ci), match=HINT):
        references.require_module(f"json.{MISSING}", HINT)


def test_require_package_dir(ci):
    folder = references.require_package_dir("json", HINT)
    assert folder == pathlib.Path(json.__file__).parent
    with pytest.raises(_outcome(ci), match=f"{MISSING} is not installed.*{HINT}"):
        references.require_package_dir(MISSING, HINT)
    # A plain module is not a package folder.
    with pytest.raises(_outcome(ci), match=HINT):
        references.require_package_dir("textwrap", HINT)


_EXAMPLE = """
import pytest

from tests import references


@pytest.fixture(scope="module")
def missing_in_fixture():
    return references.require_module("interp_no_such_reference", "pip install it")


def test_in_body():
    references.require_package_dir("interp_no_such_reference", "pip install it")


def test_in_fixture(missing_in_fixture):
    pass
"""


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_a_whole_pytest_run_fails_only_in_ci(tmp_path, ci):
    (tmp_path / "example_test.py").write_text(_EXAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = runs.ROOT  # For `tests.references`; the run's rootdir is tmp_path.
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"]
    result = subprocess.run(
        [*command, "example_test.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if ci:  # Failed in the test body, an error in the fixture: both make the run fail.
        assert result.returncode == 1, result.stdout
        assert "1 failed, 1 error" in result.stdout, result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "2 skipped" in result.stdout, result.stdout
