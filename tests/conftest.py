"""Shared fixtures: one real local Ray for the session, real synthetic JPEGs on disk."""

from __future__ import annotations

import pytest

from qdeep.data.synth import write_synthetic_planet
from qdeep.runtime import start_local_ray


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
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
