"""Ray Tune sweeps over architecture x weights x freeze depth x learning rate.

Each trial is a whole Ray Train run (Train V2 pattern): a small Tune function builds and fits a
TorchTrainer, whose workers report through Tune, so one trial can span several GPU workers.
The sweep driver sizes concurrency from the cluster's free resources, opens one MLflow parent
run, and writes results.csv, report.md and two plots.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from qdeep import io, storage, tracking
from qdeep.errors import QdeepError
from qdeep.report import ladder_plot, per_label_heatmap
from qdeep.runtime import ray_session
from qdeep.train.config import TrainConfig
from qdeep.parts import VALIDATIONS, load_plugins
from qdeep.workflows.train import (TrainingData, check_model, loop_config, prepare_data, resolve_weight_path,
                                   resolve_weights, task_parts)

SWEPT = ("arch", "weights", "freeze", "lr")
SWEEP_FILE = "qdeep_sweep.json"
TRIAL_CPU = 0.01  # the Tune function only waits on its trainer; the workers hold the real resources
# Every Ray head has this resource (Ray pins its own Train and Data state actors to the head with it). A
# trial's driver asks for a sliver of it, so it runs on the head, which is on-demand in cluster.yaml, and
# not on a spot GPU node that would take the trial down with it; the workers still go where the GPUs are.
HEAD_RESOURCE = "node:__internal_head__"
TRIAL_RESOURCES = {"cpu": TRIAL_CPU, HEAD_RESOURCE: 0.001}


@dataclass
class Sweep:
    """What is swept (lists: grid; {"choice": [...]}, {"uniform"/"loguniform": [lo, hi]}: sampled)
    and everything held fixed."""

    space: dict
    base: TrainConfig = field(default_factory=TrainConfig)
    num_samples: int = 1
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    max_failures: int = 2  # a failed trial (a worker's node lost) is retried, resuming from its last checkpoint

    @classmethod
    def from_yaml(cls, path: str | Path, **defaults) -> "Sweep":
        """The sweep file's keys win over `defaults` (the command line's sweep options)."""
        spec = yaml.safe_load(Path(path).read_text()) or {}
        space = {k: spec.pop(k) for k in SWEPT if k in spec}
        base = TrainConfig(**{k: spec.pop(k) for k in list(spec) if k in TrainConfig.__dataclass_fields__})
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise QdeepError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(space=space, base=base, **{**defaults, **spec})


def param_space(space: dict) -> dict:
    from ray import tune

    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = tune.grid_search(value)
        elif isinstance(value, dict) and len(value) == 1:
            kind, arg = next(iter(value.items()))
            samplers = {"choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
                        "loguniform": lambda a: tune.loguniform(*a)}
            if kind not in samplers:
                raise QdeepError(f"sweep key {key!r}: unknown sampler {kind!r} (choice, uniform, loguniform)")
            out[key] = samplers[kind](arg)
        else:
            out[key] = value
    return out


def tune_trial(config: dict, data: TrainingData, sweep: dict) -> None:
    """One trial: a Ray Train run named after the trial, reporting every epoch through Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from qdeep.train.driver import make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    load_plugins(sweep["plugins"])
    train_config = replace(TrainConfig(**sweep["base"]), **{k: config[k] for k in SWEPT})  # paths made absolute
    run_id = tracking.child_run(sweep["mlflow_uri"], sweep["parent_run_id"], trial_id, f"trial-{trial_id}",
                                {**train_config.as_dict(), "trial_id": trial_id})
    name = f"{sweep['name']}-{trial_id}"
    finished = _finished_run_metrics(f"{sweep['storage_path']}/{name}", train_config.epochs)
    if finished:  # resumed after its last epoch: nothing to train, but Tune needs the result
        ray.tune.report(finished)
        return
    trainer = make_trainer(
        loop_config(train_config, data, sweep["mlflow_uri"], run_id, sweep["plugins"]),
        workers=sweep["workers_per_trial"],
        name=name,
        storage_path=sweep["storage_path"],
        use_gpu=sweep["gpus_per_trial"] > 0,
        cpus=1,
        gpus=sweep["gpus_per_trial"] // sweep["workers_per_trial"],  # whole GPUs: see _check_gpus
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def _finished_run_metrics(run_path: str, epochs: int) -> dict | None:
    """The last metrics of a Ray Train run that already trained all its epochs, else None."""
    import ray.train

    try:
        metrics = ray.train.Result.from_path(run_path).metrics or {}
    except RuntimeError:  # no such run yet
        return None
    return metrics if int(metrics.get("epoch", -1)) + 1 >= epochs else None


def concurrency(sweep: Sweep) -> int:
    """Trials that fit at once: each needs all its workers placed, or trials would hold their
    Tune slots while their workers wait for each other."""
    import ray

    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // sweep.workers_per_trial)
    if sweep.gpus_per_trial:
        if not resources.get("GPU"):  # an autoscaling cluster starts GPU nodes once trials ask for them
            return sweep.max_concurrent or 1
        fits = min(fits, int(resources.get("GPU", 0) // sweep.gpus_per_trial))
    if fits < 1:
        raise QdeepError(f"one trial needs {sweep.workers_per_trial} CPU worker(s) and {sweep.gpus_per_trial} GPU(s); "
                         f"the cluster has {resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs")
    return min(fits, sweep.max_concurrent or fits)


def run_tune(out: str | Path, sweep: Sweep, data=None, labels=None, images=None, name: str = "sweep",
             storage_path: str | None = None, on_bad_image: str = "error", tracking_uri: str | None = None,
             address: str | None = None, plugins: list[str] | None = None) -> list[dict]:
    """Run (or resume) the sweep; write OUT/results.csv, report.md, ladder.png, per_label.png."""
    from ray import tune

    load_plugins(plugins)
    _check_gpus(sweep)
    sweep = replace(sweep, base=task_parts(resolve_weights(sweep.base)), space=_resolved_weights(sweep.space))
    started = time.time()
    out = Path(out).resolve()
    storage_path = storage_path or str(out / "ray_results")
    experiment = f"{storage_path}/{name}"
    uri = tracking.tracking_uri(tracking_uri)
    with ray_session(address):
        storage.check_shared_storage(storage_path)
        tracking.check_shared_tracking(tracking_uri)
        prepared = prepare_data(data, labels, images, on_bad_image, sweep.base.val_fraction, sweep.base.seed,
                                sweep.base.task, sweep.base.validation)
        metric, prefix = prepared.score_metric, VALIDATIONS.get(prepared.validation).per_label_metric
        _check_grid(sweep, len(prepared.targets))
        parent_id = _recorded_parent(experiment)
        runner = tracking.resume_run(parent_id, uri) if parent_id else tracking.mlflow_run(
            f"tune-{name}", {"space": json.dumps(sweep.space), **sweep.base.as_dict(), "name": name,
                             "num_samples": sweep.num_samples, "scheduler": sweep.scheduler,
                             "workers_per_trial": sweep.workers_per_trial, **prepared.sizes}, uri=tracking_uri)
        with runner as parent:
            _record_parent(experiment, parent.info.run_id)
            settings = {"base": sweep.base.as_dict(), "name": name, "storage_path": storage_path,
                        "mlflow_uri": uri, "parent_run_id": parent.info.run_id, "plugins": list(plugins or []),
                        "workers_per_trial": sweep.workers_per_trial, "gpus_per_trial": sweep.gpus_per_trial}
            trainable = tune.with_resources(tune.with_parameters(tune_trial, data=prepared, sweep=settings),
                                            TRIAL_RESOURCES)
            if tune.Tuner.can_restore(experiment):
                tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space(sweep.space),
                    tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=sweep.num_samples,
                                                scheduler=_scheduler(sweep), max_concurrent_trials=concurrency(sweep)),
                    run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                              failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
                )
            grid = tuner.fit()
            unfinished = _unfinished(experiment, expected_trials(sweep))
            if unfinished:  # Ctrl+C: Tune saved its state and returned early
                raise KeyboardInterrupt(f"sweep {name!r}: {unfinished} trial(s) unfinished; "
                                        "rerun with the same --name to resume")
            rows = _rows(grid, prepared.targets.vocabulary, sweep.base.epochs, metric, prefix)
            for row in rows:
                child = tracking.find_child(uri, parent.info.run_id, row["trial_id"])
                if child:  # Tune stops trials by killing them: their runs are closed here
                    status = {"completed": "FINISHED", "stopped": "KILLED"}.get(row["status"], "FAILED")
                    tracking.end_run(uri, child, status, {"qdeep_status": row["status"]})
            write_reports(out, rows, prepared.targets.vocabulary, metric, prefix)
            tracking.log_metrics({f"best_{metric}": max((r[metric] for r in rows), default=0.0),
                                  "trials": len(rows), "seconds": time.time() - started})
            tracking.log_artifacts(out / "results.csv", out / "report.md", out / "ladder.png", out / "per_label.png")
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


def _check_grid(sweep: Sweep, num_labels: int) -> None:
    """Every listed (arch, weights, freeze) must build before any trial starts."""
    def options(key):
        value = sweep.space.get(key, [getattr(sweep.base, key)])
        return value if isinstance(value, list) else value.get("choice", [getattr(sweep.base, key)])

    for arch, weights, freeze in itertools.product(*map(options, ("arch", "weights", "freeze"))):
        check_model(replace(sweep.base, arch=arch, weights=weights, freeze=freeze), num_labels)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler

    if sweep.scheduler == "none":
        return None
    if sweep.scheduler != "asha":
        raise QdeepError(f"unknown scheduler {sweep.scheduler!r} (asha or none)")
    return ASHAScheduler(time_attr="training_iteration", max_t=sweep.base.epochs, grace_period=sweep.grace_period,
                         reduction_factor=sweep.reduction_factor)


def _recorded_parent(experiment: str) -> str | None:
    recorded = storage.read_json(f"{experiment}/{SWEEP_FILE}")  # local, NFS or s3://, like the trials
    return recorded["parent_run_id"] if recorded else None


def _record_parent(experiment: str, run_id: str) -> None:
    storage.write_json(f"{experiment}/{SWEEP_FILE}", {"parent_run_id": run_id})


def _rows(grid, vocab: list[str], epochs: int, metric: str = "val_f2", prefix: str = "f2") -> list[dict]:
    """One row per trial; a trial that reported fewer epochs than asked was stopped by ASHA."""
    rows = []
    for result in grid:
        m, config = result.metrics or {}, result.config
        done = int(m.get("epoch", -1)) + 1
        status = "error" if result.error else ("completed" if done >= epochs else "stopped")
        rows.append({
            "trial_id": m.get("trial_id") or Path(result.path).name,
            **{k: config.get(k) for k in SWEPT},
            metric: round(float(m.get(metric, 0.0)), 6),
            "epochs": done,
            "status": status,
            "seconds": round(float(m.get("time_total_s", 0.0)), 1),
            **{f"{prefix}_{t}": round(float(m.get(f"{prefix}_{t}", 0.0)), 6) for t in vocab},
        })
    return sorted(rows, key=lambda r: -r[metric])


def write_reports(out: Path, rows: list[dict], vocab: list[str], metric: str = "val_f2", prefix: str = "f2") -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["trial_id", *SWEPT, metric, "epochs", "status", "seconds", *[f"{prefix}_{t}" for t in vocab]]
    with io.atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
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
    per_label_heatmap(rows, vocab, out / "per_label.png", prefix=prefix)
