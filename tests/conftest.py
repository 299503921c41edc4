"""Shared fixtures: one real local Ray for the session, real synthetic JPEGs on disk."""

from __future__ import annotations

import logging

import pytest

from qdeep.data.synth import write_synthetic_planet


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray bound to 127.0.0.1, started once and shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
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
