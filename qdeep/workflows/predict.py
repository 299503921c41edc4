"""`qdeep predict`: a saved model over an image folder (or a Planet test split) -> submission CSV.

Each saved model's config.json names its kind; PREDICTORS maps a kind to the class that loads it
(a plugin module may register more).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qdeep import io
from qdeep.baseline import FEATURES_FILE, N_FEATURES, BandHistograms, HistogramForest, color_histogram
from qdeep.baseline import KIND as HISTOGRAM_RF
from qdeep.data import BadInputPolicy, ImageSet, image_id, scan_images
from qdeep.data.pack import Pack, is_pack
from qdeep.data.images import load_rgb
from qdeep.data.planet import read_test
from qdeep.data.rasters import read_raster
from qdeep.distributed.predict import CNN_KIND, CNNPredictor
from qdeep.distributed.session import log_beside, ray_session
from qdeep.distributed.tasks import image_features
from qdeep.errors import QdeepError
from qdeep.parts import FORMATTERS, load_plugins
from qdeep.parts.formatters import default_format
from qdeep.parts.targets import load_targets
from qdeep.registry import Registry

PREDICTORS: Registry = Registry("model kind")
PREDICTORS.register(CNN_KIND)(CNNPredictor)


@PREDICTORS.register(HISTOGRAM_RF)
class HistogramPredictor:
    """Loads OUT/model of `qdeep baseline`: features on Ray, forests on the driver. A multiband
    model (its FEATURES_FILE) reads GeoTIFFs (`image_format` tif) and computes the same bands' histograms."""

    def __init__(self, model_dir: Path, tta: bool = False):  # tta: CNNs only
        self.features = BandHistograms.load(model_dir / FEATURES_FILE) if (model_dir / FEATURES_FILE).exists() else None
        self.image_format = "tif" if self.features else "jpg"
        self.model = HistogramForest.load(model_dir, self.features.n_features if self.features else N_FEATURES)
        self.num_labels = len(self.model.forests_)

    def predict_proba(self, images: ImageSet, policy: BadInputPolicy) -> tuple[np.ndarray, ImageSet]:
        fn, decode = (self.features, read_raster) if self.features else (color_histogram, load_rgb)
        x, kept = image_features(fn, images, policy, "histograms", decode=decode)
        return self.model.predict_proba(x), kept


def load_predictor(model_dir: str | Path, tta: bool = False):
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not model_dir.is_dir():
        raise QdeepError(f"{model_dir}: no such model directory (--model takes OUT/model of qdeep baseline or train)")
    saved = io.read_model_json(config, "model config")  # missing: "not a qdeep model directory (no config.json)"
    kind = saved.get("kind") if isinstance(saved, dict) else None
    try:
        predictor = PREDICTORS.get(kind)
    except QdeepError as err:  # "unknown model kind ... (known: ...)"
        raise QdeepError(f"{config}: {err}") from None
    return predictor(model_dir, tta=tta)


def load_labels(model_dir: Path):
    """The model's labels.json as its targets part; missing or unreadable: one line naming it."""
    path = model_dir / "labels.json"
    if not path.is_file():
        raise QdeepError(f"{model_dir}: no labels.json (not a complete qdeep model directory)")
    saved = io.read_model_json(path, "model labels")
    labels = saved.get("labels") if isinstance(saved, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(t, str) for t in labels):
        raise QdeepError(f"model labels {path}: `labels` must be a non-empty list of names")
    if not isinstance(saved.get("kind", ""), str):
        raise QdeepError(f"model labels {path}: `kind` must be a task name")
    try:
        return load_targets(path)
    except QdeepError as err:  # e.g. a task kind no plugin registered
        raise QdeepError(f"model labels {path}: {err}") from None


def load_thresholds(model_dir: Path, vocabulary: list[str]) -> list[float] | None:
    """The per-label thresholds of thresholds.json, in vocabulary order (None when there is none)."""
    path = model_dir / "thresholds.json"
    if not path.is_file():
        return None
    saved = io.read_model_json(path, "model thresholds")
    if not isinstance(saved, dict):
        raise QdeepError(f"model thresholds {path}: not a JSON object of label: threshold")
    missing = [t for t in vocabulary if not isinstance(saved.get(t), (int, float)) or isinstance(saved.get(t), bool)]
    if missing:
        raise QdeepError(f"model thresholds {path}: no number for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return [float(saved[t]) for t in vocabulary]


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
    the formatter `output_format` (default: kaggle-planet for tags, csv for one class per image).
    `model` is a folder or a URI (s3://.../model, read into a local copy first)."""
    parent = io.parent(model)
    if io.exists(io.child(parent, io.UNFINISHED)):  # OUT/model of a baseline or train that did not finish
        raise QdeepError(io.unfinished(parent))
    with io.local_copy(model) as local:
        try:
            return _predict(local, out, images, data, on_bad_image, address, output_format, tta, plugins)
        except QdeepError as err:  # errors name the model as the user gave it, not its local copy
            if local == Path(model):
                raise
            raise QdeepError(str(err).replace(str(local), str(model).rstrip("/"))) from None


def _predict(model: Path, out, images, data, on_bad_image, address, output_format, tta, plugins) -> dict:
    load_plugins(plugins)
    policy = BadInputPolicy(on_bad_image)
    predictor = load_predictor(model, tta=tta)
    targets = load_labels(model)
    outputs = getattr(predictor, "num_labels", None)  # a plugin's predictor may not say
    if outputs is not None and len(targets) != outputs:
        raise QdeepError(f"{model / 'labels.json'}: {len(targets)} labels, but the model predicts {outputs}")
    formatter = FORMATTERS.get(output_format or default_format(targets))()
    thresholds = load_thresholds(model, targets.vocabulary)
    if bool(images) == bool(data):
        raise QdeepError("give exactly one of --images DIR or --data DIR")
    pack = None
    if images:
        paths = scan_images(images, policy)
        todo = ImageSet(names=[image_id(p, Path(images).resolve()) for p in paths], paths=paths)
    elif is_pack(data):  # its test split, in the order it was packed (the sample submission's, if any)
        if not isinstance(predictor, CNNPredictor):
            raise QdeepError(f"--data {data}: a pack; only a `qdeep train` model predicts from a pack")
        pack = Pack(str(data))
        pack.check_format(predictor.image_format, f"--data {data}", f"the model {model} reads {predictor.image_format}")
        names = pack.rows("test", ["image"])["image"].to_pylist()
        todo = ImageSet(names=names, paths=[f"{pack.uri}:{name}" for name in names])
    else:
        todo = read_test(Path(data), policy, getattr(predictor, "image_format", "jpg"))
    if not len(todo):
        raise QdeepError(f"{images or data}: no images to predict")
    with ray_session(address, log=log_beside(out)):
        proba, kept = predictor.predict_proba(todo, policy, pack) if pack else predictor.predict_proba(todo, policy)
    pred = targets.decide(proba, thresholds)
    formatter.write(out, kept.names, targets, proba, pred)
    return {"n_predicted": len(kept), "n_skipped": policy.n_skipped, "skipped": policy.skipped, "out": str(out)}
