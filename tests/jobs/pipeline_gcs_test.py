"""The whole tiny pipeline with a gs:// workdir, against the local fake-gcs-server: every
stage's artefacts land in the bucket, nothing on local disk, and a second invocation resumes
from the bucket to the same results.

The pipeline runs as the user runs it (`python -m experiments.pipeline ... --workdir=gs://`,
a real subprocess from the repo root); it inherits the emulator settings the `gcs_emulator`
fixture put in os.environ. About 50 s per invocation on 2 CPU cores.
"""

import json
import os
import re

import fsspec
import pytest

from interp import models, paths
from tests import runs

CONFIG = "configs/demo.py:tiny=True"
TINY_STEPS = 6  # configs/demo.py:tiny=True trains the LM and the SAEs 6 steps each.

# Objects every stage must leave under the workdir (regular expressions over the names
# relative to it); configs/demo.py:tiny=True trains 4 SAEs on blocks_1/resid_post.
SAE = r"sae/saes/blocks_1\.resid_post-(topk-k4|batchtopk-k4|relu-l0\.15|jumprelu-l0\.003)-x64"
SCORES = r"influence/scores/(total|per_layer|per_token|candidates)/zarr\.json"
EXPECTED = {
    "lm": [
        r"lm/config\.json", r"lm/summary\.json", r"lm/metrics\.jsonl", r"lm/tb/events\.out\..+",
        r"lm/tokenizer/tokenizer\.json",
        r"lm/export/config\.json", r"lm/export/model\.safetensors",
        r"lm/export/tokenizer\.json", r"lm/export/tokenizer_config\.json",
        rf"lm/checkpoints/{TINY_STEPS}/commit_success\.txt",
        rf"lm/checkpoints/{TINY_STEPS}/default/manifest\.ocdbt",
    ],
    "sae": [
        r"sae/config\.json", r"sae/eval\.json", r"sae/metrics\.jsonl", r"sae/tb/events\.out\..+",
        r"sae/activations/metadata\.json",
        r"sae/activations/arrays/blocks_1\.resid_post/zarr\.json",
        r"sae/activations/arrays/blocks_1\.resid_post/c/.+",
        rf"sae/checkpoints/{TINY_STEPS}/commit_success\.txt",
        rf"{SAE}/cfg\.json", rf"{SAE}/sae_weights\.safetensors",
    ],
    "influence": [
        r"influence/config\.json",
        r"influence/factors/factors\.json", r"influence/factors/factors\.safetensors",
        r"influence/factor_checkpoints/(covariance|correction)/\d+/commit_success\.txt",
        SCORES,
        r"influence/scores/total/c/.+",
        r"influence/report/report\.html", r"influence/report/influence\.json",
        r"influence/report/layers_\d+\.png", r"influence/summary\.json",
    ],
    "analysis": [
        r"analysis/config\.json", r"analysis/dashboard\.html", r"analysis/concept\.html",
        r"analysis/density\.png", r"analysis/feature_stats\.npz", r"analysis/search\.json",
    ],
    "steer": [
        r"steer/config\.json", r"steer/steering\.json", r"steer/max_activations\.npy",
        r"steer/sweep\.png",
    ],
    "results.md": [r"results\.md"],
}  # fmt: skip
# How many distinct objects some patterns must match (alternatives in the pattern).
AT_LEAST = {rf"{SAE}/cfg\.json": 4, SCORES: 4}
# Results a resumed run must reproduce byte for byte.
RESULTS = (
    "lm/summary.json", "lm/export/model.safetensors", "sae/eval.json",
    "influence/report/influence.json", "analysis/search.json", "steer/steering.json",
    "results.md",
)  # fmt: skip


def _objects(workdir: str) -> list[str]:
    """Every object name under a gs:// folder, relative to it."""
    filesystem, root = fsspec.core.url_to_fs(workdir)
    return sorted(name[len(root) + 1 :] for name in filesystem.find(root))


def _named_like_gcs(top: str, bucket: str) -> list[str]:
    """Paths under `top` that a gs:// URL turned local would make ('gs:', 'gs', the bucket)."""
    found = []
    for folder, subfolders, files in os.walk(top):
        subfolders[:] = [d for d in subfolders if d not in (".git", ".venv", "node_modules")]
        for name in subfolders + files:
            if name in ("gs:", "gs") or bucket in name:
                found.append(os.path.join(folder, name))
    return found


def _pipeline(workdir: str):
    return runs.run_main("experiments.pipeline", CONFIG, workdir, timeout=500)


@pytest.mark.gcs_timeout(600)
def test_a_gs_workdir_holds_every_artefact_and_a_rerun_resumes_from_it(
    gcs_bucket, tmp_path, monkeypatch
):
    bucket = gcs_bucket[len("gs://") :]
    workdir = f"{gcs_bucket}/run"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # The subprocess's temporary files go here.
    first = _pipeline(workdir)
    # Nothing local named like the bucket: not in the repo (the working directory), not in
    # the temporary folder.
    for top in (runs.ROOT, str(temporary)):
        assert _named_like_gcs(top, bucket) == []
    objects = _objects(workdir)
    for stage, patterns in EXPECTED.items():
        for pattern in patterns:
            matched = {name for name in objects if re.fullmatch(pattern, name)}
            assert len(matched) >= AT_LEAST.get(pattern, 1), (
                f"No object {pattern!r} under {workdir}; {stage}/ holds "
                f"{[name for name in objects if name.startswith(stage + '/')]}"
            )
    assert {name.split("/")[0] for name in objects} == set(EXPECTED)
    # The log and the summaries name the bucket, never a local folder.
    assert f"What the run found ({workdir}/results.md)" in first.stdout
    assert f"Dashboard: {workdir}/analysis/dashboard.html" in first.stdout
    assert paths.read_bytes(f"{workdir}/results.md").decode() in first.stdout
    summary = json.loads(paths.read_bytes(f"{workdir}/lm/summary.json"))
    assert summary["export_dir"] == f"{workdir}/lm/export"
    assert summary["step"] == TINY_STEPS
    # The export is a model folder that loads from the bucket.
    model, _, tokenizer = models.from_pretrained(f"{workdir}/lm/export")
    assert tokenizer is not None and model.config.vocab_size == tokenizer.vocab_size

    results = {name: paths.read_bytes(f"{workdir}/{name}") for name in RESULTS}
    second = _pipeline(workdir)
    log = second.stderr
    for line in (
        f"Resumed LM training from step {TINY_STEPS} of {TINY_STEPS}.",
        f"Resumed SAE training from step {TINY_STEPS} of {TINY_STEPS}.",
        f"Reusing 4096 cached activation rows at {workdir}/sae/activations.",
        f"Reusing the factors in {workdir}/influence/factors.",
    ):
        assert line in log, f"not in the second run's log: {line!r}\n{log[-3000:]}"
    for recomputed in ("Trained a", "training step", "Harvesting"):
        assert recomputed not in log, f"the second run recomputed: {recomputed!r}"
    assert second.stdout == first.stdout
    for name, content in results.items():
        assert paths.read_bytes(f"{workdir}/{name}") == content, f"{name} changed on resume"
    # No new checkpoint steps, no new cache chunks; only TensorBoard opens new event files.
    rerun = [name for name in _objects(workdir) if "/tb/" not in name]
    assert rerun == [name for name in objects if "/tb/" not in name]
    for top in (runs.ROOT, str(temporary)):
        assert _named_like_gcs(top, bucket) == []
