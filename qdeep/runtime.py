"""Joining a Ray cluster, or starting a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray (tests, jobs), join `address`/RAY_ADDRESS, or start a local instance.

    Only an instance started here is shut down here.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def start_local_ray(num_cpus: int | None = None) -> None:
    """A single-machine Ray whose services, workers and DDP rendezvous listen on 127.0.0.1 only.

    Ray maps 127.0.0.1 to the machine's outward address unless multi-node support is off; its
    switch for that is named after Windows/macOS, where it is off by default.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by raylet and workers
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # The dashboard serves Ray's state API, which Ray Train uses to clean up after finished runs.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
