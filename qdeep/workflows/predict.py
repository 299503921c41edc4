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
from qdeep.metrics import binarize
from qdeep.parts.formatters import FORMATTERS
from qdeep.parts.targets import MultiLabelTargets
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
    output_format: str = "kaggle",
    tta: bool = False,
) -> dict:
    """Predict tags for `--images DIR` (recursive) or the test split of `--data DIR`."""
    model = Path(model)
    policy = BadInputPolicy(on_bad_image)
    predictor = load_predictor(model, tta=tta)
    targets = MultiLabelTargets.load(model / "labels.json")
    thresholds = json.loads((model / "thresholds.json").read_text())
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
        proba, kept = predictor.predict_proba(todo, policy)
    pred = binarize(proba, np.array([thresholds[t] for t in targets.vocabulary]))
    FORMATTERS[output_format](out, kept.names, targets.decode(pred))
    return {"n_predicted": len(kept), "n_skipped": policy.n_skipped, "skipped": policy.skipped, "out": str(out)}
