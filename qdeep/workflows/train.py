"""`qdeep train`: a CNN on Ray Train, validated every epoch, exported for `qdeep predict`."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qdeep import io, tracking
from qdeep.config import TrainConfig
from qdeep.distributed import driver
from qdeep.distributed.ingest import training_datasets
from qdeep.distributed.predict import CNN_KIND
from qdeep.distributed.prepare import TrainingData, check_model, loop_config, prepare_data, settle
from qdeep.distributed.session import log_in, ray_session
from qdeep.distributed.storage import check_shared_storage, check_shared_tracking
from qdeep.options import worker_range
from qdeep.parts import VALIDATIONS, load_plugins
from qdeep.report import per_label_bar_chart


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
    """Train, then write OUT/metrics.json and OUT/model/ (the best epoch by the task's score); OUT
    a folder or a URI (s3://...), where Ray Train's checkpoints go too unless `storage_path` says."""
    started = time.time()
    out = io.resolved(out)
    load_plugins(plugins)
    config = settle(config, data, labels, images)
    name = name or "train"
    storage_path = storage_path or io.child(out, "ray_results")
    lo, hi = worker_range(workers)
    workers = f"{lo}-{hi}" if lo < hi else hi

    with ray_session(address, log=log_in(out)):
        check_shared_storage(storage_path)
        check_shared_tracking(tracking_uri)
        prepared = prepared or prepare_data(data, labels, images, on_bad_image, config.val_fraction, config.seed,
                                            config.task, config.validation, config.image_format, config.bands)
        check_model(config, len(prepared.targets), prepared.bands)
        driver.claim_run(storage_path, name, {**config.as_dict(), **prepared.sizes,
                                              "labels": prepared.targets.vocabulary, "workers": workers})
        params = {**config.as_dict(), "workers": workers, "source": prepared.source, "name": name,
                  "max_failures": driver.default_max_failures(workers, max_failures), **prepared.sizes}
        with tracking.mlflow_run(f"train-{config.arch}", params, uri=tracking_uri) as run:
            lc = loop_config(config, prepared, tracking.tracking_uri(tracking_uri), run.info.run_id, plugins)
            outcome = driver.fit(lc, training_datasets(prepared, lc), workers, name, storage_path, max_failures, use_gpu)
            refit = None
            if config.refit:  # as Kaggle teams did: every row, for the epochs the validation split chose
                refit_config = replace(config, epochs=int(outcome.best["epoch"]) + 1, refit=False)
                lc = loop_config(refit_config, prepared, None, None, plugins, train_on_all=True)
                refit = driver.fit(lc, training_datasets(prepared, lc), workers, f"{name}-refit", storage_path,
                                   max_failures, use_gpu).latest
            with io.outputs(out) as local:  # metrics.json last: until then the outputs are marked unfinished
                metrics = export(local, outcome, prepared, config, started, run.info.run_id, refit)
                m = metrics["per_label_metric"]
                tracking.log_metrics({f"best_{prepared.score_metric}": metrics[prepared.score_metric],
                                      "n_skipped": prepared.policy.n_skipped,
                                      **{f"{m}_{t}": v for t, v in metrics[f"per_label_{m}"].items()}})
                tracking.log_artifacts(local / "metrics.json", local / f"per_label_{m}.png", local / "model")
    return metrics


def export(out: Path, outcome: driver.TrainOutcome, data: TrainingData, config: TrainConfig, started: float,
           run_id: str, refit: dict | None = None) -> dict:
    """OUT/model/ (the best epoch, for `qdeep predict`; with a refit, the refit network and the
    validation run's thresholds) and OUT/metrics.json, last (scores always from the validation run),
    into the local folder `out` (`io.outputs`)."""
    best, latest = outcome.best, outcome.latest
    vocab = data.targets.vocabulary
    m = VALIDATIONS.get(data.validation).per_label_metric  # what each label's score is: f2, f1
    scores = {k: round(float(v), 6) for k, v in best["history"][-1].items() if k.startswith("val_") and k != "val_loss"}
    per_label = dict(zip(vocab, np.round(best["per_label"], 6).tolist()))
    thresholds = None if best["thresholds"] is None else dict(zip(vocab, np.round(best["thresholds"], 4).tolist()))
    with io.atomic_dir(out / "model") as model_dir:
        torch.save((refit or best)["model"], model_dir / "model.pt")
        data.targets.save(model_dir / "labels.json")
        if thresholds is not None:
            io.write_json(model_dir / "thresholds.json", thresholds)
        io.write_json(model_dir / "config.json", {
            "kind": CNN_KIND, "task": data.targets.kind, "arch": config.arch, "image_size": config.image_size,
            "num_labels": len(vocab), "weights": config.weights, "freeze": config.freeze,
            "image_format": config.image_format, "in_chans": len(data.bands.index) if data.bands else 3,
            "bands": data.bands.to_dict() if data.bands else None,
            "band_init": config.band_init, "epoch": best["epoch"], **scores})
    history = latest["history"]
    metrics = {
        **scores,
        "score_metric": data.score_metric,
        "best_epoch": int(best["epoch"]),
        "task": data.targets.kind,
        "per_label_metric": m,
        f"per_label_{m}": per_label,
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
    per_label_bar_chart(per_label, out / f"per_label_{m}.png",
                        f"{config.arch}, {data.score_metric} = {metrics[data.score_metric]:.3f}", xlabel=m.upper())
    io.write_json(out / "metrics.json", metrics)
    return metrics
