"""Joining a Ray cluster, or starting a local one bound to 127.0.0.1; where Ray's output goes."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from qdeep.io import basename, is_uri

LOG_FILE = "ray.log"  # in OUT: Ray's driver, controller and worker output, unless --verbose
_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("qdeep_verbose", default=False)


@contextmanager
def verbose(on: bool) -> Iterator[None]:
    """Within the block, Ray's output stays on the terminal (`qdeep --verbose`)."""
    token = _VERBOSE.set(on)
    try:
        yield
    finally:
        _VERBOSE.reset(token)


def log_beside(path) -> Path:
    """Where Ray's output goes for a command whose output is a file or a store, not a folder: beside
    it, or for a URI (s3://bucket/store) in the working directory (store.ray.log)."""
    if is_uri(path):
        return Path(f"{basename(path)}.{LOG_FILE}")
    return Path(f"{str(path).removeprefix('file://')}.{LOG_FILE}")


def log_in(out) -> Path:
    """Where Ray's output goes for a command whose output is a folder: OUT/ray.log, or for a URI
    (s3://bucket/run) in the working directory (run.ray.log)."""
    return log_beside(out) if is_uri(out) else Path(out) / LOG_FILE


def quiet() -> bool:
    """Whether Ray's own output (Tune's tables, Ray Data's bars) goes to the log file, not the terminal."""
    return not _VERBOSE.get()


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, log: Path | None = None) -> Iterator[None]:
    """Use the running Ray (tests, jobs), join `address`/RAY_ADDRESS, or start a local instance.
    Only an instance started here is shut down here. With `log`, Ray's driver messages and every
    worker's output go to that file instead of the terminal, unless `verbose` is on.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    to_log = log is not None and quiet()
    with ray_output_to(log) if to_log else nullcontext():
        if address:
            ray.init(address=address, runtime_env=storage_env(), logging_level=logging.WARNING)
        else:
            start_local_ray(num_cpus)
        try:
            with _worker_output_to(log) if to_log else nullcontext():
                yield
        finally:
            ray.shutdown()


# What pyarrow and boto3 read to reach a bucket (AWS, MinIO, any S3-compatible server).
STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CA_BUNDLE")


def storage_env() -> dict | None:
    """This shell's object-store settings, as the runtime environment of a cluster joined by address,
    whose workers (on other machines) do not inherit this process's environment. None inside a Ray
    job: the job's own runtime environment carries them (`scripts/submit.sh --env KEY=VALUE`), and
    Ray refuses a driver that sets a variable the job sets too."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    env = {k: os.environ[k] for k in STORAGE_VARIABLES if k in os.environ}
    return {"env_vars": env} if env else None


@contextmanager
def ray_output_to(log: Path) -> Iterator[None]:
    """Everything written to this process's standard error by what started before the block or below
    Python (Ray's loggers, its C++ core worker, the services it starts) goes to `log`, while qdeep's
    own lines and progress bars stay on the terminal: descriptor 2 points at `log`, and `sys.stderr`
    at a copy of the terminal's descriptor. Ray Data's progress bars are off meanwhile."""
    import ray.data

    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
    saved, sys.stderr = sys.stderr, os.fdopen(terminal, "w", buffering=1)
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        sys.stderr = saved


@contextmanager
def _worker_output_to(log: Path) -> Iterator[None]:
    """What Ray forwards of its workers' and actors' stdout and stderr (Ray Train's controller and
    workers included) goes to `log`, each line prefixed with its process, instead of the terminal.
    Ray has no public switch for this (log_to_driver=False would drop the lines), so its stream
    dispatcher is told; where that is not found, the output stays on the terminal."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        yield
        return

    def write(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # its periodic status report, which Ray too keeps off the terminal
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        with open(log, "a") as f:
            f.writelines(f"({who} pid={data.get('pid')}, ip={data.get('ip')}) {line}\n" for line in data["lines"])

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("qdeep_log", write)
    try:
        yield
    finally:
        dispatcher.remove_handler("qdeep_log")


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
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", labels={LOCAL_LABEL: "1"}, logging_level=logging.WARNING)


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
