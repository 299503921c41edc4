"""Shared fixtures: one real local Ray for the session, real synthetic JPEGs on disk; the test tiers.

Every test has exactly one tier (pyproject.toml registers them):
  unit       no Ray at all, in this process or in a subprocess: `make test-fast`
  ray        a local Ray (the `ray_cluster` fixture, or a `qdeep` subprocess that starts one)
  multinode  real multi-node Ray clusters (tests/test_multinode.py)
  gpu        a CUDA GPU (tests/test_gpu.py; skipped, with the reason, where torch sees none)
A module that is wholly one tier says so with `pytestmark`; otherwise a test that uses `ray_cluster`,
directly or through other fixtures, is `ray`, and what is left is `unit`. A `unit` test that starts or
joins Ray fails, saying to mark it `ray`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from qdeep.data.synth import write_synthetic_planet
from qdeep.distributed.session import start_local_ray
from s3server import S3Server

TIERS = ("unit", "ray", "multinode", "gpu")
UNIT_TIER_SITE = Path(__file__).with_name("unit_tier")  # its sitecustomize.py guards a unit test's subprocesses
PLUGINS = Path(__file__).with_name("plugins")  # plugin modules only the tests load (`qdeep --plugin qdeep_test_hooks`)
FAULTS = Path(tempfile.mkdtemp(prefix="qdeep-test-faults-")) / "faults.json"  # what `crash_once` arms
S3 = S3Server()  # moto's S3 server on 127.0.0.1, started by the first test that asks for a bucket


def pytest_configure(config):
    """Before any Ray starts, so that every Ray worker inherits both: the tests' plugin modules
    importable (here and in the workers), and where tests/plugins/qdeep_test_hooks.py reads the
    fault to inject (QDEEP_TEST_FAULTS), and the AWS variables that point at the tests' S3 server."""
    sys.path.insert(0, str(PLUGINS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    os.environ["QDEEP_TEST_FAULTS"] = str(FAULTS)
    S3.configure()


def pytest_unconfigure(config):
    S3.stop()
    shutil.rmtree(FAULTS.parent, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Give each test its tier; `gpu` tests need CUDA: where torch sees no GPU they are skipped (and
    counted), with the reason."""
    problems = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if not tiers:
            item.add_marker("ray" if "ray_cluster" in item.fixturenames else "unit")
        elif len(tiers) > 1:
            problems.append(f"{item.nodeid}: marked {' and '.join(sorted(tiers))}; a test has exactly one tier")
        elif tiers == {"unit"} and "ray_cluster" in item.fixturenames:
            problems.append(f"{item.nodeid}: marked unit but uses the ray_cluster fixture: mark it ray")
    if problems:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(problems))

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here (see `make gpu-check`)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


UNIT_RAY = "a `unit` test started or joined Ray: mark it `ray` (or give it the ray_cluster fixture)"


class _UnitTier:
    """While a `unit` test sets up and runs, `ray.init` refuses and `ray.is_initialized()` says False,
    even when the session's Ray is up (an earlier `ray` test started it), so ray.get/put/remote and
    Ray Data, which call `ray.init` when Ray is not up, are refused too. The two are replaced once,
    by wrappers that look at `active`: a test's own monkeypatch of them (`no_ray`) then stacks and
    undoes cleanly. Python subprocesses get tests/unit_tier/sitecustomize.py, which refuses
    `ray.init` there and leaves a note. Either refusal fails the test with UNIT_RAY, even where the
    code under test swallowed the exception (a CLI turning it into exit code 1, say)."""

    active = False
    calls: list[str] = []
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        import ray

        init, is_initialized = ray.init, ray.is_initialized

        def guarded_init(*args, **kwargs):
            if cls.active:
                cls.calls.append("this process")
                raise AssertionError(UNIT_RAY)
            return init(*args, **kwargs)

        ray.init = guarded_init
        ray.is_initialized = lambda: False if cls.active else is_initialized()
        cls.installed = True


def _unit_note(item) -> Path:
    return Path(item.stash[_NOTE_DIR]) / "ray.init"


_NOTE_DIR = pytest.StashKey[str]()
_SAVED_ENV = pytest.StashKey[dict]()


@contextmanager
def _unit_phase(item):
    """One phase (setup, call) of a `unit` test: Ray refused, refusals turned into the test's failure."""
    if item.get_closest_marker("unit") is None:
        yield
        return
    _UnitTier.install()
    _UnitTier.active, _UnitTier.calls = True, []
    try:
        yield
    finally:
        _UnitTier.active = False
        note = _unit_note(item)
        where = _UnitTier.calls[:1] + [f"subprocess {line}" for line in
                                       (note.read_text().splitlines() if note.exists() else [])]
        note.unlink(missing_ok=True)
        if where:  # replaces whatever the refusal led to
            raise pytest.fail.Exception(f"{UNIT_RAY}; ray.init was called in {'; '.join(where)}",
                                        pytrace=False) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("unit") is not None:  # from here to the end of its teardown
        item.stash[_NOTE_DIR] = tempfile.mkdtemp(prefix="qdeep-unit-tier-")
        item.stash[_SAVED_ENV] = {k: os.environ.get(k) for k in ("PYTHONPATH", "QDEEP_UNIT_TIER_NOTE")}
        os.environ["QDEEP_UNIT_TIER_NOTE"] = str(_unit_note(item))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(UNIT_TIER_SITE), os.environ.get("PYTHONPATH")]))
    with _unit_phase(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _unit_phase(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        if _SAVED_ENV in item.stash:
            for key, value in item.stash[_SAVED_ENV].items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(item.stash[_NOTE_DIR], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray bound to 127.0.0.1, started once and shut down at the end."""
    import ray

    start_local_ray(num_cpus=2)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def planet_dir(tmp_path_factory):
    """A small synthetic Planet-layout dataset (train, test, sample submission, test solution)."""
    out = tmp_path_factory.mktemp("planet")
    write_synthetic_planet(out, n=240, size=48, seed=1, n_test=40)
    return out


@pytest.fixture(scope="session")
def planet4(tmp_path_factory):
    """A small synthetic Planet layout with its 4-band 16-bit GeoTIFFs (train-tif-v2/, test-tif-v2/)."""
    out = tmp_path_factory.mktemp("planet4")
    write_synthetic_planet(out, n=60, size=32, seed=2, n_test=8, bands=4)
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the case if the command starts or joins Ray (even while the session's Ray is up): bad
    input must be refused before that. For a test of any tier (a `ray` test may build its inputs on
    Ray first)."""
    import ray

    import qdeep.distributed.session

    def refuse(*_a, **_k):
        raise AssertionError("the command started Ray before refusing its input")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(qdeep.distributed.session, "start_local_ray", refuse)


@pytest.fixture
def crash_once():
    """`crash_once(rank=R, at=N, marker=PATH)`: with `--plugin qdeep_test_hooks`, rank R exits hard at
    the start of training epoch N or DeepCluster iteration N, once (the marker file records that it
    happened); `crash_once(None)`: no fault from then on. Disarmed after the test."""

    def arm(rank: int | None, at: int | None = None, marker: Path | str | None = None) -> None:
        if rank is None:
            FAULTS.unlink(missing_ok=True)
        else:
            FAULTS.write_text(json.dumps({"rank": rank, "at": at, "marker": str(marker)}))

    yield arm
    FAULTS.unlink(missing_ok=True)


@pytest.fixture
def s3_bucket(tmp_path, monkeypatch):
    """`s3://BUCKET`: a fresh bucket on the tests' real S3-protocol server (tests/s3server.py). The
    test runs in tmp_path: a command whose output is a URI puts Ray's log in the working directory."""
    monkeypatch.chdir(tmp_path)
    return S3.new_bucket()


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def interrupt_when(argv: list[str], ready, timeout: float = 300) -> None:
    """Run `qdeep ARGV` in its own process group and press Ctrl+C (SIGINT) as soon as `ready()`
    is true, as a terminal does (the whole process group); the command must then say
    `qdeep: interrupted` and exit 130. Polls a condition, never a fixed sleep."""
    import tempfile

    qdeep = str(Path(sys.executable).with_name("qdeep"))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([qdeep, *argv], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not ready() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert proc.poll() is None, "the command ended before it could be interrupted"
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
    assert code == 130 and lines and lines[-1].startswith("qdeep: interrupted"), (code, lines[-20:])
