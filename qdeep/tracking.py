"""MLflow runs: one run per command that fits or evaluates something.

The default store is MLflow's own default, `sqlite:///mlflow.db` in the working directory;
`--tracking-uri` or MLFLOW_TRACKING_URI override it. Log from the driver (or rank 0) only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_EXPERIMENT = "qdeep"


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _experiment_id(mlflow, name: str, uri: str) -> str:
    """Artifacts of a local SQLite store live beside the database, not in the caller's cwd."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def mlflow_run(
    run_name: str,
    params: dict | None = None,
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    nested: bool = False,
) -> Iterator[object]:
    """Start (or nest) a run with its parameters logged; the run is marked FAILED on error."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, experiment, uri)
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, nested=nested) as run:
        if params:
            mlflow.log_params({k: ("" if v is None else str(v))[:6000] for k, v in params.items()})
        yield run


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
