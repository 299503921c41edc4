"""`qdeep baseline`: colour histograms on Ray -> K-fold OOF forests -> thresholds -> final model."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from qdeep import io, tracking
from qdeep.config import BaselineConfig
from qdeep.baseline import N_BINS, N_FEATURES, HistogramForest, band_histograms, color_histogram
from qdeep.data import BadInputPolicy, load_dataset, load_rgb
from qdeep.data.pack import Pack
from qdeep.data.rasters import read_raster
from qdeep.distributed.session import log_in, ray_session
from qdeep.distributed.tasks import image_features
from qdeep.errors import QdeepError
from qdeep.metrics import binarize
from qdeep.parts.formatters import write_kaggle_submission
from qdeep.parts.targets import MultiLabelTargets
from qdeep.parts.validation import KFoldValidation
from qdeep.report import per_label_bar_chart


def run_baseline(
    out: str | Path,
    data: str | Path | None = None,
    labels: str | Path | None = None,
    images: str | Path | None = None,
    folds: int = BaselineConfig.folds,
    seed: int = BaselineConfig.seed,
    trees: int = BaselineConfig.trees,
    on_bad_image: str = "error",
    tracking_uri: str | None = None,
    address: str | None = None,
    image_format: str = BaselineConfig.image_format,
    bands: str | None = None,
    indices: str | None = None,
) -> dict:
    """Fit and evaluate the histogram Random Forest; write OUT/metrics.json, OUT/model/, submission.
    With `image_format` "tif", on multiband images: `bands` (default all) and spectral `indices`."""
    started = time.time()
    out = io.resolved(out)
    if folds < 2 or trees < 1:
        raise QdeepError(f"--folds must be >= 2 and --trees >= 1, got {folds} and {trees}")
    if image_format != "tif" and (bands or indices):
        raise QdeepError("--bands and --indices are for multiband images: add --image-format tif")
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images, image_format=image_format)
    _check_folds(folds, len(dataset.train), dataset.source)
    features, fn, decode = None, color_histogram, load_rgb
    if image_format == "tif":
        features = fn = band_histograms(dataset.train.paths, bands, indices,
                                        Pack(dataset.pack) if dataset.pack else None)
        decode = read_raster
    with ray_session(address, log=log_in(out)):
        x, train = image_features(fn, dataset.train, policy, "histograms (train)", dataset.pack, decode)
        x_test, test = image_features(fn, dataset.test, policy, "histograms (test)", dataset.pack, decode)
    _check_folds(folds, len(train), dataset.source)

    targets = MultiLabelTargets.from_tags(train.tags)
    y = targets.encode(train.tags)
    make_forest = partial(HistogramForest, n_estimators=trees, random_state=seed)
    params = {"model": "histogram_rf", "source": dataset.source, "folds": folds, "seed": seed, "trees": trees,
              "n_bins": N_BINS, "on_bad_image": on_bad_image, "image_format": image_format,
              "n_features": features.n_features if features else N_FEATURES}
    if features:
        params |= {"bands": ",".join(map(str, features.bands)), "indices": ",".join(features.indices) or "none"}
    with tracking.mlflow_run("baseline", params, uri=tracking_uri) as run:
        with tqdm(total=folds + 1, desc="forests (folds + final)", unit="fit") as bar:
            result = KFoldValidation(folds, seed).run(make_forest, x, y, progress=bar)
            final = make_forest().fit(x, y)
            bar.update(1)

        vocab = targets.vocabulary
        thresholds = dict(zip(vocab, result.thresholds.round(4).tolist()))
        per_label = dict(zip(vocab, result.per_label_f2.round(6).tolist()))
        metrics = {
            "f2_oof": round(result.f2, 6),
            "per_label_f2": per_label,
            "thresholds": thresholds,
            "fold_f2": [round(f, 6) for f in result.fold_f2],
            "n_images": len(train),
            "n_test": len(test),
            "image_format": image_format,
            "n_features": params["n_features"],
            "n_skipped": policy.n_skipped,
            "skipped": policy.skipped,
            "label_counts": dict(zip(vocab, y.sum(0).tolist())),
            "mlflow_run_id": run.info.run_id,
        }

        with io.outputs(out) as local:  # metrics.json last: until then the outputs are marked unfinished
            with io.atomic_dir(local / "model") as model_dir:
                final.save(model_dir)
                if features:
                    features.save(model_dir)
                targets.save(model_dir / "labels.json")
                io.write_json(model_dir / "thresholds.json", thresholds)
            artifacts = [local / "thresholds.json", local / "per_label_f2.png"]
            io.write_json(local / "thresholds.json", thresholds)
            per_label_bar_chart(per_label, local / "per_label_f2.png", f"histogram RF, OOF F2 = {result.f2:.3f}")
            if len(test):
                submission = targets.decode(binarize(final.predict_proba(x_test), result.thresholds))
                write_kaggle_submission(local / "submission.csv", test.names, submission)
                artifacts.append(local / "submission.csv")
            metrics["seconds"] = round(time.time() - started, 2)
            io.write_json(local / "metrics.json", metrics)
            tracking.log_artifacts(local / "metrics.json", *artifacts)

        tracking.log_metrics({"f2_oof": result.f2, "n_images": len(train), "n_skipped": policy.n_skipped,
                              **{f"f2_{t}": v for t, v in per_label.items()}})
        for k, f in enumerate(result.fold_f2):
            tracking.log_metrics({"fold_f2": f}, step=k)
    return metrics


def _check_folds(folds: int, n_images: int, source: str) -> None:
    """K-fold needs at least one image per fold."""
    if folds > n_images:
        raise QdeepError(f"--folds {folds}: more folds than the {n_images} usable labelled images of {source} "
                         "(each fold needs at least one)")
