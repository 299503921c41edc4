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
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()
