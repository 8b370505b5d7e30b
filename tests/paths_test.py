"""interp/paths.py: local paths made absolute, URLs kept, remote-where-local-only refused."""

import os
import pathlib

import pytest

from interp import paths


def test_local_paths_come_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(paths.resolve(pathlib.Path("b"))) == str(tmp_path / "b")
    assert str(paths.resolve("~/x")) == os.path.join(os.path.expanduser("~"), "x")
    assert str(paths.resolve("file:///tmp/a%20b")) == "/tmp/a b"
    assert str(paths.resolve("file://localhost/tmp/c")) == "/tmp/c"
    assert not paths.is_remote("file:///tmp/a") and paths.scheme("file:///tmp/a") == "file"


@pytest.mark.parametrize(
    "path, remote, scheme",
    [("gs://b/x", True, "gs"), ("GS://b/x", True, "gs"), ("memory://x", True, "memory"),
     ("/tmp/a://b", False, "file"), ("relative/dir", False, "file")],
)  # fmt: skip
def test_urls_are_told_from_local_paths(path, remote, scheme):
    assert paths.is_remote(path) is remote
    assert paths.scheme(path) == scheme
    if scheme == "gs":
        assert str(paths.resolve(path)) == path.replace("GS://", "gs://")


@pytest.mark.parametrize(
    "path, message",
    [("", "Expected a local path"), ("   ", "Expected a local path"),
     ("gs:/bucket/x", "collapsed"), (pathlib.Path("gs://bucket/x"), "collapsed"),
     ("file://otherhost/x", "names host"), ("memory://x", "not supported")],
)  # fmt: skip
def test_bad_paths_are_errors_that_say_why(path, message):
    with pytest.raises(ValueError, match=message):
        paths.resolve(path)


def test_require_local_refuses_urls_and_names_the_fix(tmp_path):
    assert paths.require_local(tmp_path, "x") == paths.resolve(tmp_path)
    with pytest.raises(paths.RemotePathError, match="save_pretrained .* 'gs://b/m'. Copy"):
        paths.require_local("gs://b/m", "save_pretrained")
    with pytest.raises(paths.RemotePathError, match="Use a local workdir"):
        paths.require_local("gs://b/m", "export", fix="Use a local workdir.")


def test_write_bytes_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.json"
    paths.write_text(target, "old")
    assert target.read_text() == "old"

    def crash(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        paths.write_text(target, "new")
    assert target.read_text() == "old"  # The old content survives a write cut short.
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_read_and_write_bytes_on_gs(gcs_bucket):
    url = f"{gcs_bucket}/dir/blob.bin"
    paths.write_bytes(url, b"\x00\x01payload")
    assert paths.read_bytes(url) == b"\x00\x01payload"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_size_and_byte_ranges(where, tmp_path, request):
    base = request.getfixturevalue("gcs_bucket") if where == "gs" else str(tmp_path)
    url = f"{base}/dir/blob.bin"
    data = bytes(range(256)) * 3
    paths.write_bytes(url, data)
    assert paths.size(url) == len(data)
    assert paths.read_range(url, 10, 300) == data[10:300]
    assert paths.read_range(url, 700, 900) == data[700:]  # Cut at the end of the file.
    assert paths.read_range(url, 5, 5) == b""
    with pytest.raises(ValueError, match="not a range"):
        paths.read_range(url, 9, 3)
    with pytest.raises(FileNotFoundError):
        paths.size(f"{base}/dir/missing.bin")
    with pytest.raises(FileNotFoundError):
        paths.read_range(f"{base}/dir/missing.bin", 0, 4)
