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
from qdeep.models import build_model, parse_freeze
from qdeep.parts.targets import MultiLabelTargets
from qdeep.parts.validation import holdout_mask
from qdeep.report import per_label_bar_chart
from qdeep.runtime import ray_session
from qdeep.train import CNN_KIND, driver
from qdeep.train.config import TrainConfig
from qdeep.workflows.common import check_images, load_dataset

NAMED_WEIGHTS = ("none", "imagenet", "bundled")


@dataclass
class TrainingData:
    """Checked images, their targets and the held-out split: prepared once on the driver, shared
    by a training run, every trial of a sweep, and every rung of the ladder."""

    targets: MultiLabelTargets
    paths: list[str]
    y: np.ndarray
    is_val: np.ndarray
    policy: BadInputPolicy
    source: str

    @property
    def sizes(self) -> dict:
        return {"n_train": int((~self.is_val).sum()), "n_val": int(self.is_val.sum())}


def prepare_data(data=None, labels=None, images=None, on_bad_image: str = "error", val_fraction: float = 0.2,
                 seed: int = 0) -> TrainingData:
    """Load, decode-check (on Ray: call inside a Ray session) and split the training images."""
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images)
    train = check_images(dataset.train, policy)
    targets = MultiLabelTargets.from_tags(train.tags)
    y = targets.encode(train.tags)
    return TrainingData(targets, [str(p) for p in train.paths], y, holdout_mask(y, val_fraction, seed), policy,
                        dataset.source)


def resolve_weights(config: TrainConfig) -> TrainConfig:
    """Workers run elsewhere: a weights path must be absolute."""
    if config.weights in NAMED_WEIGHTS:
        return config
    return replace(config, weights=str(Path(config.weights).resolve()))


def check_model(config: TrainConfig, num_labels: int) -> None:
    """Fail on the driver, in one line, on a bad arch, freeze depth or weights, not in every worker."""
    from qdeep.errors import QdeepError

    model = build_model(config.arch, num_labels, config.weights, config.freeze).eval()
    size = config.image_size or model.qdeep_arch.input_size
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise QdeepError(f"{config.arch} cannot take {size}x{size} px input ({str(exc).splitlines()[0]}); "
                         "use a larger --image-size") from None


def loop_config(config: TrainConfig, data: TrainingData, mlflow_uri: str | None, mlflow_run_id: str | None) -> dict:
    """Everything `worker.train_func` needs, as plain values."""
    paths = np.asarray(data.paths)
    train, val = ~data.is_val, data.is_val
    positives = data.y[train].sum(0)
    return {
        **config.as_dict(),
        "labels": data.targets.vocabulary,
        "train_paths": paths[train].tolist(),
        "y_train": data.y[train].tolist(),
        "val_paths": paths[val].tolist(),
        "y_val": data.y[val].tolist(),
        "pos_weight": ((train.sum() - positives) / np.maximum(positives, 1)).tolist() if config.pos_weight else None,
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
    workers: int = 2,
    name: str | None = None,
    storage_path: str | None = None,
    max_failures: int = 0,
    on_bad_image: str = "error",
    tracking_uri: str | None = None,
    address: str | None = None,
    prepared: TrainingData | None = None,
) -> dict:
    """Train, then write OUT/metrics.json and OUT/model/ (best epoch by val F2)."""
    started = time.time()
    out = Path(out).resolve()
    config = resolve_weights(config)
    parse_freeze(config.freeze)
    name = name or "train"
    storage_path = storage_path or str(out / "ray_results")

    with ray_session(address):
        prepared = prepared or prepare_data(data, labels, images, on_bad_image, config.val_fraction, config.seed)
        check_model(config, len(prepared.targets))
        driver.claim_run(storage_path, name, {**config.as_dict(), **prepared.sizes,
                                              "labels": prepared.targets.vocabulary, "workers": workers})
        params = {**config.as_dict(), "workers": workers, "source": prepared.source, "name": name,
                  "max_failures": max_failures, **prepared.sizes}
        with tracking.mlflow_run(f"train-{config.arch}", params, uri=tracking_uri) as run:
            lc = loop_config(config, prepared, tracking.tracking_uri(tracking_uri), run.info.run_id)
            outcome = driver.fit(lc, workers, name, storage_path, max_failures=max_failures)
            metrics = export(out, outcome, prepared, config, started, run.info.run_id)
            tracking.log_metrics({"best_val_f2": metrics["val_f2"], "n_skipped": prepared.policy.n_skipped,
                                  **{f"f2_{t}": v for t, v in metrics["per_label_f2"].items()}})
            tracking.log_artifacts(out / "metrics.json", out / "per_label_f2.png", out / "model")
    return metrics


def export(out: Path, outcome: driver.TrainOutcome, data: TrainingData, config: TrainConfig, started: float,
           run_id: str) -> dict:
    """OUT/model/ (the best epoch, for `qdeep predict`) and OUT/metrics.json."""
    best, latest = outcome.best, outcome.latest
    vocab = data.targets.vocabulary
    thresholds = dict(zip(vocab, np.round(best["thresholds"], 4).tolist()))
    per_label = dict(zip(vocab, np.round(best["per_label_f2"], 6).tolist()))
    with io.atomic_dir(out / "model") as model_dir:
        torch.save(best["model"], model_dir / "model.pt")
        data.targets.save(model_dir / "labels.json")
        io.write_json(model_dir / "thresholds.json", thresholds)
        io.write_json(model_dir / "config.json", {
            "kind": CNN_KIND, "arch": config.arch, "image_size": config.image_size,
            "num_labels": len(vocab), "weights": config.weights, "freeze": config.freeze,
            "epoch": best["epoch"], "val_f2": best["history"][-1]["val_f2"]})
    history = latest["history"]
    metrics = {
        "val_f2": round(float(best["history"][-1]["val_f2"]), 6),
        "best_epoch": int(best["epoch"]),
        "per_label_f2": per_label,
        "thresholds": thresholds,
        "history": history,
        "epochs_completed": len(history),
        "restarts": int(latest["restarts"]),
        **data.sizes,
        "n_skipped": data.policy.n_skipped,
        "skipped": data.policy.skipped,
        "ray_run_path": outcome.path,
        "mlflow_run_id": run_id,
        "seconds": round(time.time() - started, 2),
    }
    per_label_bar_chart(per_label, out / "per_label_f2.png", f"{config.arch}, val F2 = {metrics['val_f2']:.3f}")
    io.write_json(out / "metrics.json", metrics)
    return metrics
