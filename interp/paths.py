"""Local-or-remote paths: the one place that knows whether a path is on this machine.

Every path a user gives (workdirs, model folders, caches, SAE folders) may be local or a URL
such as `gs://bucket/run`. Readers and writers ask here instead of looking for "://":

    path = paths.resolve(workdir)            # epath.Path; local paths made absolute
    if paths.is_remote(path): ...            # gs://, memory://, ... (not file://)
    paths.require_local(folder, "save_pretrained")   # a clear error for local-only code
    data = paths.read_bytes(path); paths.write_bytes(path, data)   # atomic locally

Local paths are made absolute because orbax and tensorstore refuse or misread relative ones,
and every library downstream should see the same directory whatever its working directory.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

PathLike = str | os.PathLike


class RemotePathError(ValueError):
    """A remote (gs://, ...) path was given where only local paths work so far."""


def _text(path: PathLike) -> str:
    return os.fspath(path)


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL other than file:// (gs://bucket/x, memory://x, ...)."""
    text = _text(path)
    return "://" in text and not text.startswith("file://")


def scheme(path: PathLike) -> str:
    """'gs', 'memory', ... for URLs; 'file' for local paths (and file:// URLs)."""
    return _text(path).split("://", 1)[0] if is_remote(path) else "file"


def resolve(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local paths absolute (and file:// stripped), URLs unchanged."""
    text = _text(path)
    if is_remote(text):
        return epath.Path(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def require_local(path: PathLike, what: str) -> epath.Path:
    """`resolve(path)`, or a `RemotePathError` naming `what` when `path` is remote.

    For code that only works on local files so far: a remote path must never turn into a
    local folder named like the bucket (`gs://b/x` -> `./gs:/b/x`) without a word.

    Raises:
      RemotePathError: If `path` is a URL such as gs://bucket/x.
    """
    if is_remote(path):
        raise RemotePathError(
            f"{what} reads and writes local paths only for now; got {_text(path)!r}. "
            "Copy the folder to local disk (e.g. `gsutil -m cp -r`), or give a local path."
        )
    return resolve(path)


def read_bytes(path: PathLike) -> bytes:
    """The whole content of a local or remote file."""
    return resolve(path).read_bytes()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a file atomically: locally through a temporary sibling and a rename; on object
    stores (gs://) a single object write is atomic already."""
    path = resolve(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))
