"""`qdeep train`: a CNN on Ray Train, validated every epoch, exported for `qdeep predict`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qdeep import io, tracking
from qdeep.data import BadInputPolicy
from qdeep.errors import QdeepError
from qdeep.models import build_model, parse_freeze
from qdeep.parts import FIT_STRATEGIES, TARGETS, VALIDATIONS, load_plugins
from qdeep.parts.targets import Targets
from qdeep.report import per_label_bar_chart
from qdeep.runtime import ray_session
from qdeep.storage import check_shared_storage
from qdeep.train import CNN_KIND, driver
from qdeep.train.config import TrainConfig
from qdeep.workflows.common import check_images, load_dataset

NAMED_WEIGHTS = ("none", "imagenet", "bundled")


@dataclass
class TrainingData:
    """Checked images, their targets and the held-out split: prepared once on the driver, shared
    by a training run, every trial of a sweep, every rung of the ladder, every DeepCluster iteration."""

    targets: Targets
    paths: list[str]
    y: np.ndarray  # what targets.encode made: (n, L) 0/1 rows, or (n,) class ids
    is_val: np.ndarray
    policy: BadInputPolicy
    source: str
    validation: str  # the validation part that scores this data

    @property
    def sizes(self) -> dict:
        return {"n_train": int((~self.is_val).sum()), "n_val": int(self.is_val.sum())}

    @property
    def score_metric(self) -> str:
        """What the best epoch and the best trial are chosen by: "val_f2", "val_accuracy", ..."""
        return f"val_{VALIDATIONS.get(self.validation).metric}"


def task_parts(config: TrainConfig) -> TrainConfig:
    """The config with its validation part filled in from the task, every part name checked."""
    targets = TARGETS.get(config.task)
    validation = config.validation or targets.validation
    VALIDATIONS.get(validation)
    FIT_STRATEGIES.get(config.fit_strategy)
    if config.balance not in ("none", "weights", "uniform"):
        raise QdeepError(f"--balance {config.balance!r}: expected none, weights or uniform")
    if config.balance == "uniform" and targets.dtype != np.int64:
        raise QdeepError(f"--balance uniform samples classes uniformly: it needs a one-class-per-image task, "
                         f"not {config.task!r} (use --balance weights)")
    return replace(config, validation=validation)


def prepare_data(data=None, labels=None, images=None, on_bad_image: str = "error", val_fraction: float = 0.2,
                 seed: int = 0, task: str = "multilabel", validation: str | None = None) -> TrainingData:
    """Load, decode-check (on Ray: call inside a Ray session), encode and split the training images."""
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images)
    train = check_images(dataset.train, policy)
    targets = TARGETS.get(task).from_labels(train.tags)
    y = targets.encode(train.tags, train.origins)
    validation = validation or targets.validation
    is_val = VALIDATIONS.get(validation)().holdout(y, val_fraction, seed)
    return TrainingData(targets, [str(p) for p in train.paths], y, is_val, policy, dataset.source, validation)


def resolve_weight_path(weights: str) -> str:
    """A weights PATH made absolute here, on the driver; the named weights as they are."""
    return weights if weights in NAMED_WEIGHTS else str(Path(weights).resolve())


def resolve_weights(config):
    """The config (a TrainConfig, a DeepClusterConfig: any dataclass with `weights`) with its weights
    path resolved on the driver: workers, trials and embedding actors run elsewhere, in other
    working directories, maybe on other nodes."""
    return replace(config, weights=resolve_weight_path(config.weights))


def check_model(config: TrainConfig, num_labels: int) -> None:
    """Fail on the driver, in one line, on a bad arch, freeze depth, fit strategy or weights, not in every worker."""
    model = build_model(config.arch, num_labels, config.weights, config.freeze).eval()
    FIT_STRATEGIES.get(config.fit_strategy)().stages(config.as_dict())
    size = config.image_size or model.qdeep_arch.input_size
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise QdeepError(f"{config.arch} cannot take {size}x{size} px input ({str(exc).splitlines()[0]}); "
                         "use a larger --image-size") from None


def loop_config(config: TrainConfig, data: TrainingData, mlflow_uri: str | None, mlflow_run_id: str | None,
                plugins: list[str] | None = None, train_on_all: bool = False) -> dict:
    """Everything `worker.train_func` needs, as plain values. `train_on_all`: the validation rows
    are trained on too (a refit; its validation scores are then no longer held out)."""
    paths = np.asarray(data.paths)
    val = data.is_val
    train = np.ones_like(val) if train_on_all else ~val
    return {
        **config.as_dict(),
        "task": data.targets.kind,
        "validation": data.validation,
        "score_metric": data.score_metric,
        "labels": data.targets.vocabulary,
        "train_paths": paths[train].tolist(),
        "y_train": data.y[train].tolist(),
        "val_paths": paths[val].tolist(),
        "y_val": data.y[val].tolist(),
        "plugins": list(plugins or []),
        "launch_id": uuid.uuid4().hex,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }


def run_train(
    out: str | Path,
    config: TrainConfig,
    data: str | Path | None = None,
    labels: str | Path | None = None,
    images: str | Path | None = None,
    workers: int | str | tuple[int, int] = 2,  # N, or MIN-MAX / (MIN, MAX): elastic
    name: str | None = None,
    storage_path: str | None = None,
    max_failures: int | None = None,  # None: 0, or driver.ELASTIC_MAX_FAILURES for MIN-MAX workers
    on_bad_image: str = "error",
    tracking_uri: str | None = None,
    address: str | None = None,
    prepared: TrainingData | None = None,
    plugins: list[str] | None = None,
    use_gpu: bool | None = None,
) -> dict:
    """Train, then write OUT/metrics.json and OUT/model/ (the best epoch by the task's score)."""
    started = time.time()
    out = Path(out).resolve()
    load_plugins(plugins)
    config = task_parts(resolve_weights(config))
    parse_freeze(config.freeze)
    name = name or "train"
    storage_path = storage_path or str(out / "ray_results")
    lo, hi = driver.worker_range(workers)
    workers = f"{lo}-{hi}" if lo < hi else hi

    with ray_session(address):
        check_shared_storage(storage_path)
        tracking.check_shared_tracking(tracking_uri)
        prepared = prepared or prepare_data(data, labels, images, on_bad_image, config.val_fraction, config.seed,
                                            config.task, config.validation)
        check_model(config, len(prepared.targets))
        driver.claim_run(storage_path, name, {**config.as_dict(), **prepared.sizes,
                                              "labels": prepared.targets.vocabulary, "workers": workers})
        params = {**config.as_dict(), "workers": workers, "source": prepared.source, "name": name,
                  "max_failures": driver.default_max_failures(workers, max_failures), **prepared.sizes}
        with tracking.mlflow_run(f"train-{config.arch}", params, uri=tracking_uri) as run:
            lc = loop_config(config, prepared, tracking.tracking_uri(tracking_uri), run.info.run_id, plugins)
            outcome = driver.fit(lc, workers, name, storage_path, max_failures=max_failures, use_gpu=use_gpu)
            refit = None
            if config.refit:
                refit = refit_all_rows(config, prepared, outcome, workers, name, storage_path, max_failures,
                                       use_gpu, plugins)
            metrics = export(out, outcome, prepared, config, started, run.info.run_id, refit)
            m = metrics["per_label_metric"]
            tracking.log_metrics({f"best_{prepared.score_metric}": metrics[prepared.score_metric],
                                  "n_skipped": prepared.policy.n_skipped,
                                  **{f"{m}_{t}": v for t, v in metrics[f"per_label_{m}"].items()}})
            tracking.log_artifacts(out / "metrics.json", out / f"per_label_{m}.png", out / "model")
    return metrics


def refit_all_rows(config: TrainConfig, data: TrainingData, outcome: driver.TrainOutcome, workers, name: str,
                   storage_path: str, max_failures: int | None, use_gpu: bool | None, plugins) -> dict:
    """`--refit`, as Kaggle teams did: the same training on every row (validation rows included)
    for the number of epochs the validation split chose; returns the last epoch's state."""
    epochs = int(outcome.best["epoch"]) + 1
    refit_config = replace(config, epochs=epochs, refit=False)
    lc = loop_config(refit_config, data, None, None, plugins, train_on_all=True)
    return driver.fit(lc, workers, f"{name}-refit", storage_path, max_failures=max_failures, use_gpu=use_gpu).latest


def export(out: Path, outcome: driver.TrainOutcome, data: TrainingData, config: TrainConfig, started: float,
           run_id: str, refit: dict | None = None) -> dict:
    """OUT/model/ (the best epoch, for `qdeep predict`; with a refit, the refit network and the
    validation run's thresholds) and OUT/metrics.json (scores always from the validation run)."""
    best, latest = outcome.best, outcome.latest
    vocab = data.targets.vocabulary
    validation = VALIDATIONS.get(data.validation)
    best_epoch = best["history"][-1]
    scores = {k: round(float(v), 6) for k, v in best_epoch.items() if k.startswith("val_") and k != "val_loss"}
    per_label = dict(zip(vocab, np.round(best["per_label"], 6).tolist()))
    thresholds = None if best["thresholds"] is None else dict(zip(vocab, np.round(best["thresholds"], 4).tolist()))
    with io.outputs(out):  # metrics.json last: until then the outputs are marked unfinished
        with io.atomic_dir(out / "model") as model_dir:
            torch.save((refit or best)["model"], model_dir / "model.pt")
            data.targets.save(model_dir / "labels.json")
            if thresholds is not None:
                io.write_json(model_dir / "thresholds.json", thresholds)
            io.write_json(model_dir / "config.json", {
                "kind": CNN_KIND, "task": data.targets.kind, "arch": config.arch, "image_size": config.image_size,
                "num_labels": len(vocab), "weights": config.weights, "freeze": config.freeze,
                "epoch": best["epoch"], **scores})
        history = latest["history"]
        metrics = {
            **scores,
            "score_metric": data.score_metric,
            "best_epoch": int(best["epoch"]),
            "task": data.targets.kind,
            "per_label_metric": validation.per_label_metric,
            f"per_label_{validation.per_label_metric}": per_label,
            **({"thresholds": thresholds} if thresholds is not None else {}),
            "history": history,
            "epochs_completed": len(history),
            "restarts": int(latest["restarts"]),
            **({"refit_epochs": len(refit["history"])} if refit else {}),
            **data.sizes,
            "n_skipped": data.policy.n_skipped,
            "skipped": data.policy.skipped,
            "ray_run_path": outcome.path,
            "mlflow_run_id": run_id,
            "seconds": round(time.time() - started, 2),
        }
        score = metrics[data.score_metric]
        per_label_bar_chart(per_label, out / f"per_label_{validation.per_label_metric}.png",
                            f"{config.arch}, {data.score_metric} = {score:.3f}", xlabel=validation.per_label_metric.upper())
        io.write_json(out / "metrics.json", metrics)
    return metrics
