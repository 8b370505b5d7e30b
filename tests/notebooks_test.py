"""The notebooks in notebooks/ run top to bottom (nbclient, a real kernel) on a tiny pipeline
run, so they never rot."""

import os

import pytest

from tests import references, runs

# References the suite needs: missing ones skip locally and fail under CI=true.
_HINT = "pip install -e '.[test]' (nbclient, nbformat, ipykernel)"
nbclient = references.require_module("nbclient", _HINT)
nbformat = references.require_module("nbformat", _HINT)
references.require_module("ipykernel", _HINT)

# Every notebook; each reads a pipeline workdir (INTERP_WORKDIR).
NOTEBOOKS = ("quickstart.ipynb", "features.ipynb", "steering.ipynb", "influence.ipynb")


@pytest.fixture(scope="module")
def workdir(tiny_pipeline):
    return tiny_pipeline[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(workdir, name, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_WORKDIR", workdir)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", runs.ROOT)  # The checkout's interp, in the kernel too.
    notebook = nbformat.read(os.path.join(runs.ROOT, "notebooks", name), as_version=4)
    # Run in a scratch folder so files the notebooks write stay out of the checkout.
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name == "features.ipynb":
        html = [o for o in outputs if "text/html" in o.get("data", {})]
        assert html and "<iframe srcdoc=" in html[-1].data["text/html"]
        assert "x its max" in text
    if name == "steering.ipynb":
        assert "10 x max" in text and "unsteered" in text
    if name == "influence.ipynb":
        assert "Call me Ishmael" in text
    if name == "quickstart.ipynb":
        assert "layers" in text and "blocks_0/attn/pattern" in text
