"""MLflow runs: one run per command that fits or evaluates something.

The default store is MLflow's own default, `sqlite:///mlflow.db` in the working directory;
`--tracking-uri` or MLFLOW_TRACKING_URI override it. Log from the driver (or rank 0) only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXPERIMENT = "qdeep"


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def store_directory(uri: str) -> str | None:
    """The directory a file-based MLflow store lives in (a SQLite file's, a `file:` or plain path
    store's own), or None for a store reached over the network (http(s)://, databricks, postgresql://, ...)."""
    import re
    from urllib.parse import urlparse

    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if uri.lower() in ("databricks", "databricks-uc", "uc") or (scheme and scheme[1].lower() not in ("sqlite", "file")):
        return None
    if not scheme:
        return str(Path(uri).resolve())
    if scheme[1].lower() == "file":
        return str(Path(urlparse(uri).path).resolve())
    database = uri.split("?", 1)[0][len("sqlite:"):].removeprefix("///")  # sqlite:////abs.db, sqlite:///rel.db
    return str(Path(database).resolve().parent)


def _experiment_id(mlflow, uri: str) -> str:
    """Artifacts of a local SQLite store live beside the database, not in the caller's cwd."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / EXPERIMENT).resolve().as_uri()
    return mlflow.create_experiment(EXPERIMENT, artifact_location=location)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _param(value) -> str:
    return ("" if value is None else str(value))[:6000]


def _owner_tags() -> dict:
    """The process a RUNNING run belongs to."""
    import socket

    pid = os.getpid()
    return {"qdeep.host": socket.gethostname(), "qdeep.pid": str(pid), "qdeep.pid_started": _started(pid) or "?"}


def _started(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot, so a reused pid differs), "?" where
    that is unknown but the process exists, None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # another user's process: it exists
            pass
        return "?"


def _alive(pid: str, started: str) -> bool:
    try:
        now = _started(int(pid))
    except ValueError:
        return False
    return now is not None and (now == started or "?" in (now, started))


def _close_dead_runs(experiment_id: str, uri: str) -> None:
    """Runs of this experiment left RUNNING by a qdeep command of this machine that died (SIGKILL,
    a power cut: no `finally` ran) are marked KILLED, with their RUNNING child runs, so the UI does
    not show them running for ever. Runs of live processes and of other machines are left alone."""
    import socket

    client = _client(uri)
    host = socket.gethostname().replace("'", "")
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                f"tags.`qdeep.host` = '{host}'")
    for run in running:
        tags = run.data.tags
        if _alive(tags.get("qdeep.pid", ""), tags.get("qdeep.pid_started", "")):
            continue
        children = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                     f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for r in [run, *children]:
            client.set_tag(r.info.run_id, "qdeep_status", "died")
            client.set_terminated(r.info.run_id, "KILLED")


@contextmanager
def mlflow_run(run_name: str, params: dict | None = None, uri: str | None = None,
               nested: bool = False) -> Iterator[object]:
    """Start (or nest) a run with its parameters logged; the run is marked FAILED on error. A run
    records the process that owns it, and runs whose process died are closed first (`_close_dead_runs`)."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, uri)
    nested = nested or mlflow.active_run() is not None  # inside a sweep or ladder: a child run
    if not nested:
        _close_dead_runs(experiment_id, uri)
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, nested=nested,
                          tags=_owner_tags()) as run:
        if params:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


@contextmanager
def parent_run(run_id: str | None, run_name: str, params: dict, uri: str | None = None) -> Iterator[object]:
    """A run whose children (a sweep's trials, DeepCluster's iterations) stay under it across
    reruns: `run_id`, which the first launch recorded, reopened; without one, a new run."""
    if run_id is None:
        with mlflow_run(run_name, params, uri=uri) as run:
            yield run
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    with mlflow.start_run(run_id=run_id, tags=_owner_tags()) as run:
        yield run


def child_run(uri: str, parent_run_id: str, key: str, name: str, params: dict) -> str:
    """The one child run of `parent_run_id` tagged `key`, created on first use: a trial that is
    resumed or restarted logs into the same run, never a duplicate."""
    found = find_child(uri, parent_run_id, key)
    if found:
        return found
    client = _client(uri)
    run = client.create_run(client.get_run(parent_run_id).info.experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": parent_run_id, "qdeep_key": key})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, _param(v))
    return run.info.run_id


def find_child(uri: str, parent_run_id: str, key: str) -> str | None:
    client = _client(uri)
    found = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.qdeep_key = '{key}'",
    )
    return found[0].info.run_id if found else None


def end_run(uri: str, run_id: str, status: str, tags: dict) -> None:
    """Close a run created with `child_run` (FINISHED, KILLED or FAILED)."""
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(*paths: str | Path) -> None:
    import mlflow

    for path in paths:
        if Path(path).exists():
            mlflow.log_artifact(str(path))


def _metric_key(key: str) -> str:
    """MLflow keys allow alphanumerics and _-. /; tags like 'partly_cloudy' pass unchanged."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)
