"""Local-or-remote paths: the one place that knows whether a path is on this machine.

Every path a user gives (workdirs, model folders, caches, SAE folders) may be local or a URL
such as `gs://bucket/run`. Readers and writers ask here instead of looking for "://":

    path = paths.resolve(workdir)            # epath.Path; local paths made absolute
    if paths.is_remote(path): ...            # gs://, memory://, ... (not file://)
    paths.require_local(folder, "The corpus cache")  # a clear error for local-only code
    data = paths.read_bytes(path); paths.write_bytes(path, data)   # atomic locally
    head = paths.read_range(path, 0, 8)      # byte ranges: one request each on gs://

Local paths are made absolute because orbax and tensorstore refuse or misread relative ones,
and every library downstream should see the same directory whatever its working directory.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import uuid

import fsspec
from etils import epath

PathLike = str | os.PathLike


class RemotePathError(ValueError):
    """A remote (gs://, ...) path was given where only local paths work so far."""


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# 'gs:/bucket/x': what pathlib.Path('gs://bucket/x') turns a URL into.
_MANGLED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def _text(path: PathLike) -> str:
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Expected a local path or a URL such as gs://bucket/x; got {path!r}.")
    mangled = _MANGLED_URL.match(text)
    if mangled and mangled.group(1).lower() in ("gs", "s3", "file", "memory", "http", "https"):
        raise ValueError(
            f"{text!r} looks like a URL whose '//' was collapsed (pathlib.Path('gs://b/x') "
            f"gives 'gs:/b/x'); pass the URL as a string, e.g. '{mangled.group(1)}://...'."
        )
    url = _URL.match(text)
    if url:  # Schemes are case-insensitive; fsspec and epath know them in lower case.
        text = url.group(1).lower() + text[len(url.group(1)) :]
    return text


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL other than file:// (gs://bucket/x, memory://x, ...)."""
    url = _URL.match(_text(path))
    return bool(url) and url.group(1).lower() != "file"


def scheme(path: PathLike) -> str:
    """'gs', 'memory', ... for URLs; 'file' for local paths (and file:// URLs)."""
    url = _URL.match(_text(path))
    return url.group(1).lower() if url else "file"


def resolve(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local paths absolute (file:// URLs and ~ resolved), other
    URLs unchanged.

    Raises:
      ValueError: For an empty path, a URL collapsed by pathlib ('gs:/b/x'), a file:// URL
        naming another host, or a URL scheme etils.epath cannot open.
    """
    text = _text(path)
    if is_remote(text):
        try:
            return epath.Path(text)
        except KeyError:
            raise ValueError(
                f"{text!r}: {scheme(text)}:// paths are not supported; use a local path or "
                "gs://bucket/path."
            ) from None
    if scheme(text) == "file":
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text!r} names host {parsed.netloc!r}; use file:///abs/path.")
        text = urllib.parse.unquote(parsed.path)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def require_local(path: PathLike, what: str, fix: str | None = None) -> epath.Path:
    """`resolve(path)`, or a `RemotePathError` naming `what` when `path` is remote.

    For code that only works on local files so far: a remote path must never turn into a
    local folder named like the bucket (`gs://b/x` -> `./gs:/b/x`) without a word. `fix` says
    what to do instead (default: copy the folder to local disk).

    Raises:
      RemotePathError: If `path` is a URL such as gs://bucket/x.
    """
    if is_remote(path):
        raise RemotePathError(
            f"{what} reads and writes local paths only for now; got {_text(path)!r}. "
            + (
                fix
                or "Copy the folder to local disk (e.g. `gsutil -m cp -r`), or give a local path."
            )
        )
    return resolve(path)


def kvstore(path: PathLike, what: str = "Arrays") -> dict:
    """The tensorstore kvstore spec of a local folder or gs://bucket/prefix (a folder: '/').

    Raises:
      ValueError: For other URL schemes, naming `what` ('Activation caches', ...).
    """
    text = _text(path)
    if scheme(text) == "gs":
        bucket, _, prefix = text[len("gs://") :].partition("/")
        prefix = prefix.strip("/")
        return {"driver": "gcs", "bucket": bucket, "path": prefix + "/" if prefix else ""}
    if is_remote(text):
        raise ValueError(f"{what} live on local disk or gs://; got {text!r}.")
    return {"driver": "file", "path": os.fspath(resolve(text)) + "/"}


def read_bytes(path: PathLike) -> bytes:
    """The whole content of a local or remote file."""
    return resolve(path).read_bytes()


def size(path: PathLike) -> int:
    """The size of a local or remote file in bytes.

    Raises:
      FileNotFoundError: If there is no file at `path`.
    """
    path = resolve(path)
    if not is_remote(path):
        return os.path.getsize(path)
    filesystem, name = fsspec.core.url_to_fs(os.fspath(path))
    if not filesystem.isfile(name):
        raise FileNotFoundError(f"No file at {path}.")
    return int(filesystem.size(name))


def read_range(path: PathLike, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a local or remote file (fewer if the file ends before `stop`).

    On gs:// this is one ranged GET, so a large object can be read piece by piece without
    ever holding all of it.

    Raises:
      FileNotFoundError: If there is no file at `path`.
      ValueError: If `start` > `stop` or either is negative.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"Byte range [{start}, {stop}) of {path} is not a range.")
    path = resolve(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    if start == stop:
        return b""
    # fsspec directly (epath has no ranged read): the same gcsfs client epath uses for gs://.
    filesystem, name = fsspec.core.url_to_fs(os.fspath(path))
    return filesystem.cat_file(name, start=start, end=stop)


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
