"""Imports run one way: experiments -> jobs -> (sae, influence, steering, analysis) -> data ->
models; utilities (parallel, paths, safetensors_io, records, launch) import no science room.

Every `import` statement in `interp/` counts, including ones inside functions.
"""

import ast
import pathlib

import pytest

from tests.runs import ROOT

# Rooms by layer: a room may import rooms of a lower layer (and utilities), never higher.
LAYERS = {
    "models": 0,
    "data": 1,
    "sae": 2,
    "influence": 2,
    "steering": 2,
    "analysis": 2,
    "checkpoint": 2,  # Serve jobs and the SAE/influence loops; import no science room.
    "metrics": 2,
    "jobs": 3,
}
# Device and file utilities any layer may use; they import no room above them.
UTILITIES = {"parallel", "paths", "safetensors_io", "records", "launch", "preemption"}
# Rooms of one layer that must not import each other (checkpoint and metrics may be used by
# the science rooms of their layer).
SIBLINGS_APART = {("sae", "influence"), ("influence", "sae")}
SERVICES = {"checkpoint", "metrics"}


def _room(module: str) -> str | None:
    """'models' for 'interp.models.hooks'; None outside interp."""
    parts = module.split(".")
    return parts[1] if parts[0] == "interp" and len(parts) > 1 else None


def _imports(path: pathlib.Path, package: str) -> list[str]:
    """Absolute names of every module imported by the file (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from interp import data` imports interp.data: keep the longest name per alias.
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def violations(root: pathlib.Path) -> list[str]:
    """'interp/x.py imports interp.y: why' for every import against the layering."""
    found: list[str] = []
    for path in sorted((root / "interp").rglob("*.py")):
        relative = path.relative_to(root)
        parts = relative.with_suffix("").parts
        if path.name == "__init__.py":  # interp/models/__init__.py is interp.models.
            parts = parts[:-1]
        module = ".".join(parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        source = _room(module)
        for name in _imports(path, package):
            if name.split(".")[0] in ("experiments", "configs"):
                found.append(f"{relative} imports {name}: interp never imports the mains")
            target = _room(name)
            if source is None or target is None or target == source:
                continue
            unplaced = [r for r in (source, target) if r not in LAYERS and r not in UTILITIES]
            if unplaced:
                found.append(f"{relative} imports {name}: place {unplaced} in LAYERS/UTILITIES")
                continue
            if source in UTILITIES:
                if target not in UTILITIES:
                    found.append(f"{relative} imports {name}: a utility imports no room")
            elif target in UTILITIES:
                continue
            elif (source, target) in SIBLINGS_APART:
                found.append(f"{relative} imports {name}: {source} and {target} stay apart")
            else:
                lower = LAYERS[target] < LAYERS[source]
                service_for_science = target in SERVICES and source not in ("models", "data")
                if source in SERVICES and target not in SERVICES and target != "models":
                    found.append(f"{relative} imports {name}: {source} imports no science room")
                elif not (lower or service_for_science):
                    found.append(f"{relative} imports {name}: {source} is below {target}")
    return list(dict.fromkeys(found))


def test_interp_imports_point_one_way():
    assert violations(pathlib.Path(ROOT)) == []


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "name, text, why",
    [
        ("interp/models/x.py", "from interp.data import text\n", "models is below data"),
        ("interp/models/x.py", "def f():\n    from interp.jobs import lm\n", "below jobs"),
        ("interp/models/x.py", "from interp import checkpoint\n", "models is below checkpoint"),
        ("interp/models/x.py", "import interp.metrics\n", "models is below metrics"),
        ("interp/parallel/x.py", "from interp.models import hooks\n", "a utility imports no"),
        ("interp/parallel/x.py", "from ..models import hooks\n", "a utility imports no"),
        ("interp/sae/x.py", "from interp.influence import scores\n", "stay apart"),
        ("interp/influence/x.py", "from interp.sae import io\n", "stay apart"),
        ("interp/data/x.py", "from interp.sae import io\n", "data is below sae"),
        ("interp/checkpoint.py", "from interp.sae import io\n", "imports no science room"),
        ("interp/jobs/x.py", "from experiments import common\n", "never imports the mains"),
        ("interp/newroom/x.py", "from interp.models import hooks\n", "place ['newroom']"),
        ("interp/models/__init__.py", "from ..data import text\n", "models is below data"),
        ("interp/parallel/__init__.py", "from ..models import hooks\n", "a utility imports no"),
        ("interp/models/sub/__init__.py", "from ...jobs import lm\n", "models is below jobs"),
    ],
)
def test_each_kind_of_wrong_import_is_caught(tmp_path, name, text, why):
    root = _tree(tmp_path, {name: text})
    (found,) = violations(root)
    assert why in found


def test_imports_the_layering_allows_pass(tmp_path):
    root = _tree(
        tmp_path,
        {
            "interp/jobs/x.py": "from interp.sae import train\nfrom interp import checkpoint\n",
            "interp/sae/x.py": "from interp.data import cache\nfrom interp import metrics\n",
            "interp/models/x.py": "from interp import parallel, paths\n",
            "interp/parallel/x.py": "from interp.parallel import mesh\nfrom interp import paths\n",
            "interp/__init__.py": "from interp import models\n",
            "interp/sae/__init__.py": "from .io import load\nfrom . import train\n",
        },
    )
    assert violations(root) == []
