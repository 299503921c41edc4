"""`qdeep tune`: a Ray Tune sweep over architecture x weights x freeze depth x learning rate, each
trial a whole Ray Train run (qdeep/distributed/tune.py). The driver sizes concurrency from the
cluster's free resources, opens one MLflow parent run (a child per trial), and writes results.csv,
report.md and two plots."""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from qdeep import io, tracking
from qdeep.config import SWEEP_OPTIONS, SWEPT, Sweep, pick
from qdeep.data.inputs import InputBands
from qdeep.distributed.prepare import check_model, prepare_data, resolve_weight_path, settle
from qdeep.distributed.session import log_in, quiet, ray_session
from qdeep.distributed.storage import check_shared_storage, check_shared_tracking
from qdeep.distributed.tune import TRIAL_RESOURCES, concurrency, param_space, scheduler, tune_trial
from qdeep.errors import QdeepError
from qdeep.html_report import tune_report
from qdeep.parts import VALIDATIONS, load_plugins
from qdeep.report import ladder_plot, per_label_heatmap

SWEEP_FILE = "qdeep_sweep.json"  # the sweep's settings and MLflow parent run, beside its trials


def run_tune(out: str | Path, sweep: Sweep, data=None, labels=None, images=None, name: str = "sweep",
             storage_path: str | None = None, on_bad_image: str = "error", tracking_uri: str | None = None,
             address: str | None = None, plugins: list[str] | None = None) -> list[dict]:
    """Run (or resume) the sweep; write OUT/results.csv, report.md, ladder.png, per_label.png, report.html (OUT a
    folder or a URI, where the trials go too unless `storage_path` says)."""
    from ray import tune

    load_plugins(plugins)
    _check_gpus(sweep)
    sweep = replace(sweep, base=settle(sweep.base, data, labels, images), space=_resolved_weights(sweep.space))
    started = time.time()
    out = io.resolved(out)
    storage_path = storage_path or io.child(out, "ray_results")
    experiment = f"{storage_path}/{name}"
    uri = tracking.tracking_uri(tracking_uri)
    with ray_session(address, log=log_in(out)):
        check_shared_storage(storage_path)
        check_shared_tracking(tracking_uri)
        prepared = prepare_data(data, labels, images, on_bad_image, sweep.base.val_fraction, sweep.base.seed,
                                sweep.base.task, sweep.base.validation, sweep.base.image_format, sweep.base.bands)
        metric, prefix = prepared.score_metric, VALIDATIONS.get(prepared.validation).per_label_metric
        vocab = prepared.targets.vocabulary
        _check_grid(sweep, len(vocab), prepared.bands)
        settings = {"space": sweep.space, **sweep.base.as_dict(),
                    **pick(sweep, [o for o in SWEEP_OPTIONS if o != "max_concurrent"])}
        record = f"{experiment}/{SWEEP_FILE}"  # local, NFS or s3://, like the trials
        refusal = f"sweep {name!r} in {storage_path} was started with different settings"
        parent_id = io.claim_run(record, settings, refusal, "--name").get("mlflow_run_id")
        params = {"space": json.dumps(sweep.space), **sweep.base.as_dict(), "name": name,
                  "num_samples": sweep.num_samples, "scheduler": sweep.scheduler,
                  "workers_per_trial": sweep.workers_per_trial, **prepared.sizes}
        with tracking.parent_run(parent_id, f"tune-{name}", params, uri) as parent:
            io.record_run(record, settings, mlflow_run_id=parent.info.run_id)
            trial_settings = {"base": sweep.base.as_dict(), "name": name, "storage_path": storage_path,
                              "mlflow_uri": uri, "parent_run_id": parent.info.run_id, "plugins": list(plugins or []),
                              "workers_per_trial": sweep.workers_per_trial, "gpus_per_trial": sweep.gpus_per_trial}
            trainable = tune.with_resources(
                tune.with_parameters(tune_trial, data=prepared, settings=trial_settings), TRIAL_RESOURCES)
            if tune.Tuner.can_restore(experiment):  # a rerun: finished trials stay, the others resume
                tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space(sweep.space),
                    tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=sweep.num_samples,
                                                scheduler=scheduler(sweep), max_concurrent_trials=concurrency(sweep)),
                    run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0 if quiet() else None,
                                              failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
                )
            grid = tuner.fit()
            unfinished = _unfinished(experiment, expected_trials(sweep))
            if unfinished:  # Ctrl+C: Tune saved its state and returned early
                raise KeyboardInterrupt(f"sweep {name!r}: {unfinished} trial(s) unfinished; "
                                        "rerun with the same --name to resume")
            rows = _rows(grid, vocab, sweep.base.epochs, metric, prefix)
            for row in rows:  # Tune stops trials by killing them: their runs are closed here
                child = tracking.find_child(uri, parent.info.run_id, row["trial_id"])
                if child:
                    status = {"completed": "FINISHED", "stopped": "KILLED"}.get(row["status"], "FAILED")
                    tracking.end_run(uri, child, status, {"qdeep_status": row["status"]})
            tracking.log_metrics({f"best_{metric}": max((r[metric] for r in rows), default=0.0),
                                  "trials": len(rows), "seconds": time.time() - started})
            with io.outputs(out) as local:
                tracking.log_artifacts(*write_reports(local, rows, vocab, metric, prefix, params))
    return rows


def expected_trials(sweep: Sweep) -> int:
    grids = [len(v) for v in sweep.space.values() if isinstance(v, list)]
    return sweep.num_samples * (math.prod(grids) if grids else 1)


def _unfinished(experiment: str, expected: int) -> int:
    """Trials not yet ended, read from the state Tune saved (an interrupted fit() returns normally,
    with its running trials looking finished in memory)."""
    from ray.tune import ExperimentAnalysis

    ended = sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(experiment).trials)
    return max(expected - ended, 0)


def _resolved_weights(space: dict) -> dict:
    """The space with each weights PATH made absolute on the driver: a trial runs in its own
    directory, maybe on another node."""
    value = space.get("weights")
    if isinstance(value, str):
        value = resolve_weight_path(value)
    elif isinstance(value, list):
        value = [resolve_weight_path(w) for w in value]
    elif isinstance(value, dict) and isinstance(value.get("choice"), list):
        value = {"choice": [resolve_weight_path(w) for w in value["choice"]]}
    return {**space, "weights": value} if "weights" in space else space


def _check_gpus(sweep: Sweep) -> None:
    """Each worker of a trial is one DDP rank on a device of its own: --gpus-per-trial must give every
    worker a whole GPU (Ray would hand two fractional workers the same device, and NCCL refuses two
    ranks on one GPU)."""
    gpus, workers = sweep.gpus_per_trial, sweep.workers_per_trial
    if workers < 1:
        raise QdeepError(f"--workers-per-trial must be at least 1, got {workers}")
    if gpus < 0 or gpus % workers:
        raise QdeepError(f"--gpus-per-trial {gpus:g} with --workers-per-trial {workers} gives each worker "
                         f"{gpus / workers:g} GPU, so DDP ranks would share a device; use --gpus-per-trial 0 "
                         f"(CPU) or a multiple of --workers-per-trial ({workers}, {2 * workers}, ...)")


def _check_grid(sweep: Sweep, num_labels: int, bands: InputBands | None = None) -> None:
    """Every listed (arch, weights, freeze) must build before any trial starts."""
    def options(key):
        value = sweep.space.get(key, getattr(sweep.base, key))
        if isinstance(value, dict):  # a sampler: only a choice lists its values
            value = value.get("choice", getattr(sweep.base, key))
        return value if isinstance(value, list) else [value]

    for arch, weights, freeze in itertools.product(*map(options, ("arch", "weights", "freeze"))):
        check_model(replace(sweep.base, arch=arch, weights=weights, freeze=freeze), num_labels, bands)


def _rows(grid, vocab: list[str], epochs: int, metric: str, prefix: str) -> list[dict]:
    """One row per trial, best first; a trial that reported fewer epochs than asked was stopped by ASHA."""
    rows = []
    for result in grid:
        m, config = result.metrics or {}, result.config
        done = int(m.get("epoch", -1)) + 1
        rows.append({
            "trial_id": m.get("trial_id") or Path(result.path).name,
            **{k: config.get(k) for k in SWEPT},
            metric: round(float(m.get(metric, 0.0)), 6),
            "epochs": done,
            "status": "error" if result.error else ("completed" if done >= epochs else "stopped"),
            "seconds": round(float(m.get("time_total_s", 0.0)), 1),
            **{f"{prefix}_{t}": round(float(m.get(f"{prefix}_{t}", 0.0)), 6) for t in vocab},
        })
    return sorted(rows, key=lambda r: -r[metric])


def write_reports(out: Path, rows: list[dict], vocab: list[str], metric: str, prefix: str,
                  settings: dict | None = None) -> list[Path]:
    """results.csv, report.md, the two plots and report.html (`settings` on it); returns their paths."""
    columns = ["trial_id", *SWEPT, metric, "epochs", "status", "seconds", *[f"{prefix}_{t}" for t in vocab]]
    io.write_csv(out / "results.csv", columns, ([r[c] for c in columns] for r in rows))
    lines = ["# Sweep results", "", f"| rank | trial | arch | weights | freeze | lr | {metric} | epochs | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['trial_id']} | {r['arch']} | {r['weights']} | {r['freeze']} | {r['lr']:g} | "
                     f"{r[metric]:.4f} | {r['epochs']} | {r['status']} |")
    if rows:
        best = rows[0]
        lines += ["", f"Best: `{best['arch']}`, weights `{best['weights']}`, freeze `{best['freeze']}`, "
                      f"lr {best['lr']:g}: {metric} {best[metric]:.4f}."]
    io.write_text(out / "report.md", "\n".join(lines) + "\n")
    ladder_plot(rows, out / "ladder.png", metric)
    per_label_heatmap([f"{r['arch']}/{r['freeze']}/{r['lr']:g}" for r in rows],
                      [[r[f"{prefix}_{t}"] for t in vocab] for r in rows], vocab, out / "per_label.png",
                      prefix.upper())
    tune_report(out, rows, metric, settings or {})
    return [out / n for n in ("results.csv", "report.md", "ladder.png", "per_label.png", "report.html")]
