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


LOCAL_LABEL = "qdeep-local"  # the node label of a Ray that start_local_ray started


def start_local_ray(num_cpus: int | None = None) -> None:
    """A single-machine Ray whose services, workers and DDP rendezvous listen on 127.0.0.1 only.

    Ray maps 127.0.0.1 to the machine's outward address unless multi-node support is off; its
    switch for that is named after Windows/macOS, where it is off by default. Its node carries the
    label LOCAL_LABEL, so any process using it (this one, a test's subprocess joining it by address)
    knows that no other node will join it (see `is_local_ray`). `address="local"`: a new instance
    even when another Ray runs on this machine, which a bare `ray.init()` would find and join.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by raylet and workers
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # The dashboard serves Ray's state API, which Ray Train uses to clean up after finished runs.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             labels={LOCAL_LABEL: "1"}, logging_level=logging.WARNING)


def is_local_ray(nodes: list[dict]) -> bool:
    """Whether the Ray whose alive `nodes` (ray.nodes() entries) these are is a plain local one that
    start_local_ray started: one machine, loopback only, that never gains a node.

    Any other Ray may gain nodes while a run goes on, whether or not they are up now: a cluster
    joined by --address or RAY_ADDRESS, a `ray start --head`, a cluster launcher's head whose
    autoscaler starts GPU nodes on demand. Asking the cluster (a label on its node) rather than
    remembering what this process did keeps the answer right for a process that joins qdeep's
    local Ray (a job, a test's subprocess) and for one that joins a real cluster.
    """
    return bool(nodes) and all(n.get("Labels", {}).get(LOCAL_LABEL) == "1" for n in nodes)
