"""Shared fixtures: one real local Ray for the session, real synthetic JPEGs on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdeep.data.synth import write_synthetic_planet
from qdeep.distributed.session import start_local_ray


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: where torch sees no GPU they are skipped (and counted), with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here (see `make gpu-check`)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


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


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the case if the command starts or joins Ray (even while the session's Ray is up): bad
    input must be refused before that."""
    import ray

    import qdeep.distributed.session

    def refuse(*_a, **_k):
        raise AssertionError("the command started Ray before refusing its input")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(qdeep.distributed.session, "start_local_ray", refuse)


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
