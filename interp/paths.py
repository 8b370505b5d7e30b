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

import datetime
import email.utils
import hashlib
import json
import os
import re
import time
import urllib.parse
import uuid
from typing import NamedTuple

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


def sha256(path: PathLike) -> str:
    """Hex sha256 of a local file's bytes, read in 1 MiB blocks (pinned downloads)."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# --- Objects with generations (gs://): compare-and-swap on the store's own counter ---------
#
# Every write of a GCS object gives it a new `generation`; a write or delete with the
# precondition `ifGenerationMatch=N` happens only if the object's generation is still N
# (N=0: only if there is no object), atomically on the server. This is what a lock on an
# object store needs: never a read followed by a write, which two writers can interleave.


class GenerationMismatch(Exception):
    """A generation-matched write or delete found another generation (someone wrote first)."""


class ObjectVersion(NamedTuple):
    """One generation of an object: its bytes, its generation, when the store last wrote
    it and the store's clock when it was read (seconds since the epoch; a reader's own clock
    may be off, the store's is the one every writer shares)."""

    data: bytes
    generation: int
    updated: float
    server_time: float


def _gcs(path: PathLike, what: str):
    """(gcsfs filesystem, bucket, key) of a gs:// path; a ValueError for other paths."""
    text = _text(path)
    if scheme(text) != "gs":
        raise ValueError(f"{what} works on gs:// objects only; got {text!r}.")
    filesystem, _ = fsspec.core.url_to_fs(text)
    bucket, _, key = text[len("gs://") :].partition("/")
    return filesystem, bucket, key


def _rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_object_version(path: PathLike) -> ObjectVersion | None:
    """The current generation of a gs:// object with its bytes, or None if there is none.

    The bytes are read pinned to the generation the metadata named, so data and generation
    belong together even if the object is rewritten in between (then None is returned too:
    the caller reads again).
    """
    filesystem, bucket, key = _gcs(path, "read_object_version")
    try:
        headers, body = filesystem.call("GET", "b/{}/o/{}", bucket, key)
        metadata = json.loads(body)
        generation = int(metadata["generation"])
        _, data = filesystem.call("GET", "b/{}/o/{}", bucket, key, alt="media",
                                  generation=generation)  # fmt: skip
    except FileNotFoundError:
        return None
    now = time.time()
    try:  # Whole seconds: trusted only where this machine's clock disagrees with it.
        server_time = email.utils.parsedate_to_datetime(headers["Date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        server_time = now
    if -1 <= now - server_time <= 2:
        server_time = now
    return ObjectVersion(bytes(data), generation, _rfc3339(metadata["updated"]), server_time)


def write_if_generation(path: PathLike, data: bytes, generation: int) -> int:
    """Writes a gs:// object only if its generation is `generation` (0: only if it does not
    exist), atomically on the server; returns the new generation.

    A multipart upload: the local GCS emulator (fake-gcs-server) honours the precondition
    on those, not on `uploadType=media` ones.

    Raises:
      GenerationMismatch: If the object's generation was another (or it existed, for 0).
    """
    filesystem, bucket, key = _gcs(path, "write_if_generation")
    boundary = f"=={uuid.uuid4().hex}=="
    body = (
        (
            f"--{boundary}\nContent-Type: application/json; charset=UTF-8\n\n"
            + json.dumps({"name": key})
            + f"\n--{boundary}\nContent-Type: application/octet-stream\n\n"
        ).encode()
        + data
        + f"\n--{boundary}--".encode()
    )
    try:
        written = filesystem.call(
            "POST",
            f"{filesystem._location}/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o",
            uploadType="multipart",
            ifGenerationMatch=str(int(generation)),
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
            json_out=True,
        )
    except FileExistsError:  # gcsfs's name for HTTP 412 Precondition Failed.
        raise GenerationMismatch(f"{path}: generation is not {generation}") from None
    filesystem.invalidate_cache(f"{bucket}/{key}")
    return int(written["generation"])


def delete_if_generation(path: PathLike, generation: int) -> None:
    """Deletes a gs:// object only if its generation is `generation` (nothing if absent).

    Raises:
      GenerationMismatch: If the object has another generation now.
    """
    filesystem, bucket, key = _gcs(path, "delete_if_generation")
    try:
        filesystem.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(int(generation)))
    except FileExistsError:
        raise GenerationMismatch(f"{path}: generation is not {generation}") from None
    except FileNotFoundError:
        pass
    filesystem.invalidate_cache(f"{bucket}/{key}")
