"""`qdeep train`: a CNN on Ray Train, validated every epoch, exported for `qdeep predict`."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qdeep import io, tracking
from qdeep.data import BadInputPolicy
from qdeep.models import build_model, parse_freeze
from qdeep.parts.targets import MultiLabelTargets
from qdeep.parts.validation import KFoldValidation
from qdeep.report import per_label_bar_chart
from qdeep.runtime import ray_session
from qdeep.train import driver
from qdeep.train.config import TrainConfig
from qdeep.workflows.common import check_images, load_dataset

CNN_KIND = "cnn"


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
) -> dict:
    """Train, then write OUT/metrics.json and OUT/model/ (best epoch by val F2)."""
    started = time.time()
    out = Path(out).resolve()
    if config.weights not in ("none", "imagenet", "bundled"):
        config = replace(config, weights=str(Path(config.weights).resolve()))
    parse_freeze(config.freeze)
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images)
    name = name or "train"
    storage_path = storage_path or str(out / "ray_results")

    with ray_session(address):
        train = check_images(dataset.train, policy)
        targets = MultiLabelTargets.from_tags(train.tags)
        y = targets.encode(train.tags)
        # Fail here, in one line, on a bad arch, freeze depth or weights, not in every worker.
        build_model(config.arch, len(targets), config.weights, config.freeze)
        n_folds = max(2, round(1 / config.val_fraction))
        is_val = KFoldValidation(n_folds, config.seed).split(y) == 0
        paths = np.array([str(p) for p in train.paths])
        sizes = {"n_train": int((~is_val).sum()), "n_val": int(is_val.sum())}
        driver.claim_run(storage_path, name, {**config.as_dict(), **sizes, "labels": targets.vocabulary,
                                              "workers": workers})
        params = {**config.as_dict(), "workers": workers, "source": dataset.source, "name": name,
                  "max_failures": max_failures, **sizes}
        with tracking.mlflow_run(f"train-{config.arch}", params, uri=tracking_uri) as run:
            n_train, positives = int((~is_val).sum()), y[~is_val].sum(0)
            loop_config = {
                **config.as_dict(),
                "labels": targets.vocabulary,
                "train_paths": paths[~is_val].tolist(),
                "y_train": y[~is_val].tolist(),
                "val_paths": paths[is_val].tolist(),
                "y_val": y[is_val].tolist(),
                "pos_weight": ((n_train - positives) / np.maximum(positives, 1)).tolist() if config.pos_weight else None,
                "launch_id": uuid.uuid4().hex,
                "mlflow_uri": tracking.tracking_uri(tracking_uri),
                "mlflow_run_id": run.info.run_id,
            }
            outcome = driver.fit(loop_config, workers, name, storage_path, max_failures=max_failures)
            metrics = _export(out, outcome, targets, config, policy, started, run.info.run_id, sizes)
            tracking.log_metrics({"best_val_f2": metrics["val_f2"], "n_skipped": policy.n_skipped,
                                  **{f"f2_{t}": v for t, v in metrics["per_label_f2"].items()}})
            tracking.log_artifacts(out / "metrics.json", out / "per_label_f2.png", out / "model")
    return metrics


def _export(out: Path, outcome: driver.TrainOutcome, targets: MultiLabelTargets, config: TrainConfig,
            policy: BadInputPolicy, started: float, run_id: str, sizes: dict) -> dict:
    best, latest = outcome.best, outcome.latest
    vocab = targets.vocabulary
    thresholds = dict(zip(vocab, np.round(best["thresholds"], 4).tolist()))
    per_label = dict(zip(vocab, np.round(best["per_label_f2"], 6).tolist()))
    with io.atomic_dir(out / "model") as model_dir:
        torch.save(best["model"], model_dir / "model.pt")
        targets.save(model_dir / "labels.json")
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
        **sizes,
        "n_skipped": policy.n_skipped,
        "skipped": policy.skipped,
        "ray_run_path": outcome.path,
        "mlflow_run_id": run_id,
        "seconds": round(time.time() - started, 2),
    }
    per_label_bar_chart(per_label, out / "per_label_f2.png", f"{config.arch}, val F2 = {metrics['val_f2']:.3f}")
    io.write_json(out / "metrics.json", metrics)
    return metrics
