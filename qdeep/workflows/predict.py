"""`qdeep predict`: a saved model over an image folder (or a Planet test split) -> submission CSV.

Each saved model's config.json names its kind; PREDICTORS maps a kind to the class that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qdeep.baseline import KIND as HISTOGRAM_RF, HistogramForest, color_histogram
from qdeep.data import BadInputPolicy, ImageSet, image_id, scan_images
from qdeep.data.planet import read_test
from qdeep.errors import QdeepError
from qdeep.parallel import check_visible_everywhere
from qdeep.parts import FORMATTERS, load_plugins
from qdeep.parts.formatters import default_format
from qdeep.parts.targets import load_targets
from qdeep.runtime import ray_session
from qdeep.train import CNN_KIND
from qdeep.workflows.common import image_features


class HistogramPredictor:
    """Loads OUT/model of `qdeep baseline`: features on Ray, forests on the driver."""

    def __init__(self, model_dir: Path):
        self.model = HistogramForest.load(model_dir)

    def predict_proba(self, images: ImageSet, policy: BadInputPolicy) -> tuple[np.ndarray, ImageSet]:
        x, kept = image_features(color_histogram, images, policy, "histograms")
        return self.model.predict_proba(x), kept


def _cnn_predictor(model_dir: Path, tta: bool = False):
    from qdeep.train.predict import CNNPredictor

    return CNNPredictor(model_dir, tta=tta)


PREDICTORS = {HISTOGRAM_RF: lambda model_dir, tta=False: HistogramPredictor(model_dir), CNN_KIND: _cnn_predictor}


def load_predictor(model_dir: str | Path, tta: bool = False):
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise QdeepError(f"{model_dir}: not a qdeep model directory (no config.json)")
    kind = json.loads(config.read_text()).get("kind")
    if kind not in PREDICTORS:
        raise QdeepError(f"{config}: unknown model kind {kind!r} (known: {', '.join(PREDICTORS)})")
    return PREDICTORS[kind](model_dir, tta=tta)


def run_predict(
    model: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    data: str | Path | None = None,
    on_bad_image: str = "error",
    address: str | None = None,
    output_format: str | None = None,
    tta: bool = False,
    plugins: list[str] | None = None,
) -> dict:
    """Predict labels for `--images DIR` (recursive) or the test split of `--data DIR`, written by
    the formatter `output_format` (default: kaggle-planet for tags, csv for one class per image)."""
    model = Path(model)
    load_plugins(plugins)
    policy = BadInputPolicy(on_bad_image)
    predictor = load_predictor(model, tta=tta)
    targets = load_targets(model / "labels.json")
    formatter = FORMATTERS.get(output_format or default_format(targets))()
    thresholds_file = model / "thresholds.json"
    thresholds = json.loads(thresholds_file.read_text()) if thresholds_file.is_file() else None
    if bool(images) == bool(data):
        raise QdeepError("give exactly one of --images DIR or --data DIR")
    if images:
        paths = scan_images(images, policy)
        todo = ImageSet(names=[image_id(p, Path(images).resolve()) for p in paths], paths=paths)
    else:
        todo = read_test(Path(data), policy)
    if not len(todo):
        raise QdeepError(f"{images or data}: no images to predict")
    with ray_session(address):
        check_visible_everywhere(todo.paths)
        proba, kept = predictor.predict_proba(todo, policy)
    pred = targets.decide(proba, None if thresholds is None else [thresholds[t] for t in targets.vocabulary])
    formatter.write(out, kept.names, targets, proba, pred)
    return {"n_predicted": len(kept), "n_skipped": policy.n_skipped, "skipped": policy.skipped, "out": str(out)}
