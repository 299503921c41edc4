"""The seed platform's benchmark model: colour histograms + one Random Forest per label.

A scikit-learn estimator (parameters in __init__, checks and learning in fit, answers in
predict_proba; get_params/set_params/clone from BaseEstimator); no Ray here.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import skops.io
from PIL import Image
from sklearn.base import BaseEstimator
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import Tree
from sklearn.utils.validation import check_X_y
from skops.io.exceptions import UntrustedTypesFoundException

from qdeep import io
from qdeep.data.rasters import BandLayout, Raster, spectral_index
from qdeep.errors import QdeepError

N_BINS = 26
N_FEATURES = 3 * N_BINS
KIND = "histogram_rf"
# The forests are saved with skops, not joblib/pickle: loading a pickle runs whatever code it holds,
# so sharing a model would be sharing code. skops builds only the types it is told to trust: its
# defaults (scikit-learn estimators, numpy arrays, builtins) and qdeep's list below, never what a
# file asks for. It trusts no sklearn Tree by default, because a Tree's node indices are used
# unchecked at predict time; `_check_forest` bounds-checks them before any prediction.
# Cost (200 trees, 2000 rows, 3 labels, 2 cores): save 0.8 s, load 0.5 s, 6.0 MB, against joblib's
# 0.24 s, 0.12 s, 4.3 MB; the arrays in a plain .npz would mean rebuilding sklearn's Tree by hand.
MODEL_FILE = "forests.skops"
FEATURES_FILE = "features.json"  # a multiband model's BandHistograms; none: RGB colour histograms
OLD_MODEL_FILE = "forests.joblib"  # before skops: refused, never loaded
TRUSTED_TYPES = [
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
]
# 256 intensity values -> 26 equal-width bins; PIL counts the 256 values in C, numpy sums runs.
_BIN_STARTS = np.searchsorted((np.arange(256) * N_BINS) // 256, np.arange(N_BINS))


def color_histogram(image: Image.Image) -> np.ndarray:
    """78 features: a 26-bin histogram of each of R, G, B, each normalised to sum to 1."""
    counts = np.fromiter(image.histogram(), dtype=np.int64, count=768).reshape(3, 256)
    hist = np.add.reduceat(counts, _BIN_STARTS, axis=1) / counts[0].sum()
    return hist.reshape(-1).astype(np.float32)


@dataclass(frozen=True)
class BandHistograms:
    """The features of a multiband image (a rasters.Raster): a 26-bin histogram of each band in
    `bands` (0-based, of the file's) on that band's range [low, high] in the training images, then
    one of each spectral index in `indices` on [-1, 1], each normalised to sum to 1, no-data samples
    left out. Every image must have `count` bands of `dtype`, as `first` (the training set's first
    image) has. Saved with the model (FEATURES_FILE), so that predict computes the same."""

    bands: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    count: int
    dtype: str
    first: str
    names: tuple[str, ...] = ()  # the file's band names, which the indices need
    indices: tuple[str, ...] = ()

    @property
    def n_features(self) -> int:
        return N_BINS * (len(self.bands) + len(self.indices))

    def __call__(self, raster: Raster) -> np.ndarray:
        BandLayout(self.count, self.dtype, self.first, "training set").check(raster, "image")  # the caller names the file
        values, out = raster.as_float(), []
        for i in self.bands:
            out.append(_normalised(values[i], self.low[i], self.high[i]))
        for index in self.indices:
            out.append(_normalised(spectral_index(values, self.names, index), -1.0, 1.0))
        return np.concatenate(out).astype(np.float32)

    def save(self, model_dir: Path) -> None:
        io.write_json(model_dir / FEATURES_FILE, asdict(self))

    @classmethod
    def load(cls, path: Path) -> BandHistograms:
        """The features `save` wrote; a file that is unreadable or not of this shape is one line naming it."""
        saved = io.read_model_json(path, "model features")
        try:
            spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            ok = (len(spec.low) == len(spec.high) == spec.count and all(0 <= b < spec.count for b in spec.bands)
                  and spec.bands and np.dtype(spec.dtype).kind in "uif")
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise QdeepError(f"model features {path}: not the features of a `qdeep baseline` multiband model "
                             f"({json.dumps(saved)[:200]})")
        return spec


def band_histograms(paths: list, bands: str | None = None, indices: str | None = None, pack=None) -> BandHistograms:
    """The multiband features for a data set whose training images are `paths`: the bands that
    `bands` names (rasters.band_indices; Planet's b, g, r, nir names for 4-band images) and the
    spectral `indices` (comma-separated), each band's range from a sample of the set
    (rasters.training_sample; `pack`: a `data.pack.Pack` holding them, `paths` their names)."""
    from qdeep.data.rasters import (INDICES, PLANET_BANDS, band_indices, band_names, band_statistics, sample_rasters,
                                    training_sample)

    sources, names = training_sample(paths, pack)
    rasters, layout = sample_rasters(sources, names=names)
    names = band_names(layout.count)
    wanted = tuple(i.strip().lower() for i in indices.split(",")) if indices else ()
    unknown = [i for i in wanted if i not in INDICES]
    if unknown:
        raise QdeepError(f"--indices {indices}: unknown index {unknown[0]!r} (known: {', '.join(INDICES)})")
    for index in wanted:
        missing = [b for b in INDICES[index] if b not in names]
        if missing:
            raise QdeepError(f"--indices {index} needs the {' and '.join(missing)} band(s); images of {layout.count} "
                             f"band(s) have no band names (4-band images are Planet's {', '.join(PLANET_BANDS)})")
    stats = band_statistics(rasters)
    return BandHistograms(tuple(band_indices(bands, layout.count, names)), stats.low, stats.high, layout.count,
                          layout.dtype, layout.first, tuple(names), wanted)


def _normalised(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """A N_BINS-bin histogram of the non-NaN `values` on [low, high] (outliers in the end bins), summing to 1."""
    valid = values[~np.isnan(values)]
    counts, _ = np.histogram(np.clip(valid, low, high), bins=N_BINS, range=(low, high if high > low else low + 1))
    return counts / max(int(counts.sum()), 1)


class HistogramForest(BaseEstimator):
    """One RandomForestClassifier per label; a label constant in training predicts its constant."""

    def __init__(self, n_estimators: int = 200, min_samples_leaf: int = 1, n_jobs: int = -1, random_state: int = 0):
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, x: np.ndarray, y: np.ndarray) -> "HistogramForest":
        """x: (n, features); y: (n, L), one 0/1 column per label. The forests check their own parameters."""
        x, y = check_X_y(x, y, multi_output=True)
        if y.ndim != 2:
            raise ValueError(f"y must have one column per label, got shape {y.shape}")
        self.forests_: list[RandomForestClassifier | float] = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if col.min() == col.max():
                self.forests_.append(float(col[0]))
                continue
            forest = RandomForestClassifier(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
                                            n_jobs=self.n_jobs, random_state=self.random_state + j)
            self.forests_.append(forest.fit(x, col))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, L) probability of each label."""
        out = np.empty((len(x), len(self.forests_)), dtype=np.float64)
        for j, forest in enumerate(self.forests_):
            out[:, j] = forest if isinstance(forest, float) else forest.predict_proba(x)[:, 1]
        return out

    def save(self, model_dir: Path) -> None:
        skops.io.dump(self.forests_, model_dir / MODEL_FILE, compression=zipfile.ZIP_DEFLATED, compresslevel=3)
        io.write_json(model_dir / "config.json", {"kind": KIND, "n_bins": N_BINS, "params": self.get_params()})

    @classmethod
    def load(cls, model_dir: Path, n_features: int = N_FEATURES) -> "HistogramForest":
        """The model `save` wrote, over `n_features` features; a file that is missing, old (joblib),
        corrupt or holds anything but checked forests is one QdeepError line naming it. Nothing in
        the files is run."""
        model_dir = Path(model_dir)
        model = cls(**_read_params(model_dir / "config.json"))
        path = model_dir / MODEL_FILE
        if not path.is_file():
            if (model_dir / OLD_MODEL_FILE).exists():
                raise QdeepError(f"{model_dir / OLD_MODEL_FILE}: a baseline model in the old joblib (pickle) format, "
                                 f"which qdeep no longer loads because loading it could run code; rerun "
                                 f"`qdeep baseline` to get a model in the safe format ({MODEL_FILE})")
            raise QdeepError(f"{model_dir}: no {MODEL_FILE} (not a complete `qdeep baseline` model directory)")
        try:
            forests = skops.io.load(path, trusted=TRUSTED_TYPES)
        except UntrustedTypesFoundException as err:
            first = str(err).splitlines()[0].rstrip(".")
            raise QdeepError(f"cannot load baseline model {path}: refused, it holds types qdeep does not trust "
                             f"({first.split(': ', 1)[-1]})") from None
        except Exception as err:  # noqa: BLE001 - zip, JSON, schema errors of all kinds
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise QdeepError(f"cannot load baseline model {path}: not a skops file written by `qdeep baseline` "
                             f"({type(err).__name__}: {first})") from None
        model.forests_ = _checked_forests(forests, path, model.n_jobs, n_features)
        return model


def _read_params(path: Path) -> dict:
    config = io.read_model_json(path)
    params = config.get("params") if isinstance(config, dict) else None
    known = set(HistogramForest().get_params())
    if not isinstance(params, dict) or not set(params) <= known or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in params.values()):
        raise QdeepError(f"model config {path}: `params` must hold integer {', '.join(sorted(known))}")
    return params


def _checked_forests(forests, path: Path, n_jobs: int, n_features: int = N_FEATURES) -> list:
    """`forests` if it is what `fit` builds (a list of forests or constant probabilities) with every
    tree's node indices in bounds (sklearn's predict follows them unchecked); else a QdeepError."""
    def bad(why: str):
        return QdeepError(f"cannot load baseline model {path}: {why}")

    if not isinstance(forests, list) or not forests:
        raise bad(f"expected a list of forests, found {type(forests).__name__}")
    for j, forest in enumerate(forests):
        if isinstance(forest, float):
            if not 0.0 <= forest <= 1.0:
                raise bad(f"label {j}: constant probability {forest!r} outside [0, 1]")
        elif isinstance(forest, RandomForestClassifier):
            try:
                _check_forest(forest, n_features)
            except ValueError as err:
                raise bad(f"label {j}: {err}") from None
            # this machine's settings, not the file's (no more threads than cores)
            forest.n_jobs, forest.verbose = (min(n_jobs, os.cpu_count() or 1) if n_jobs > 0 else -1), 0
        else:
            raise bad(f"label {j}: a {type(forest).__name__}, not a RandomForestClassifier or a probability")
    return forests


def _check_forest(forest: RandomForestClassifier, n_features: int = N_FEATURES) -> None:
    """ValueError unless `forest` is a fitted binary forest over `n_features` histogram bins whose
    trees only point forward to existing nodes and only test existing features."""
    if getattr(forest, "n_features_in_", None) != n_features or getattr(forest, "n_outputs_", None) != 1:
        raise ValueError(f"not a single-output forest over {n_features} features")
    if getattr(forest, "n_classes_", None) != 2 or len(np.asarray(getattr(forest, "classes_", []))) != 2:
        raise ValueError("not a two-class forest")
    trees = getattr(forest, "estimators_", None)
    if not isinstance(trees, list) or not trees:
        raise ValueError("a forest without trees")
    for i, est in enumerate(trees):
        tree = getattr(est, "tree_", None)
        if (not isinstance(est, DecisionTreeClassifier) or not isinstance(tree, Tree)
                or getattr(est, "n_features_in_", None) != n_features or getattr(est, "n_outputs_", None) != 1
                or getattr(est, "n_classes_", None) != 2 or tree.n_features != n_features or tree.n_outputs != 1
                or list(tree.n_classes) != [2]):
            raise ValueError(f"tree {i} is not a two-class decision tree over {n_features} features")
        n = tree.node_count
        left, right, feature = tree.children_left, tree.children_right, tree.feature
        if n < 1 or not len(left) == len(right) == len(feature) == n or tree.value.shape != (n, 1, 2):
            raise ValueError(f"tree {i}: inconsistent node arrays")
        node = np.arange(n)
        leaf = left == -1
        inner = ~leaf
        # sklearn numbers children after their parent: forward links also rule out cycles
        if (not np.array_equal(right == -1, leaf)
                or ((left[inner] <= node[inner]) | (left[inner] >= n)).any()
                or ((right[inner] <= node[inner]) | (right[inner] >= n)).any()
                or ((feature[inner] < 0) | (feature[inner] >= n_features)).any()):
            raise ValueError(f"tree {i}: node links or features out of bounds")
