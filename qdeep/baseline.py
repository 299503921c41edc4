"""The seed platform's benchmark model: colour histograms + one Random Forest per label.

A scikit-learn estimator (parameters in __init__, checks and learning in fit, answers in
predict_proba; get_params/set_params/clone from BaseEstimator); no Ray here.
"""

from __future__ import annotations

import os
import zipfile
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
    def load(cls, model_dir: Path) -> "HistogramForest":
        """The model `save` wrote; a file that is missing, old (joblib), corrupt or holds anything
        but checked forests is one QdeepError line naming it. Nothing in the files is run."""
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
        model.forests_ = _checked_forests(forests, path, model.n_jobs)
        return model


def _read_params(path: Path) -> dict:
    config = io.read_model_json(path)
    params = config.get("params") if isinstance(config, dict) else None
    known = set(HistogramForest().get_params())
    if not isinstance(params, dict) or not set(params) <= known or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in params.values()):
        raise QdeepError(f"model config {path}: `params` must hold integer {', '.join(sorted(known))}")
    return params


def _checked_forests(forests, path: Path, n_jobs: int) -> list:
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
                _check_forest(forest)
            except ValueError as err:
                raise bad(f"label {j}: {err}") from None
            # this machine's settings, not the file's (no more threads than cores)
            forest.n_jobs, forest.verbose = (min(n_jobs, os.cpu_count() or 1) if n_jobs > 0 else -1), 0
        else:
            raise bad(f"label {j}: a {type(forest).__name__}, not a RandomForestClassifier or a probability")
    return forests


def _check_forest(forest: RandomForestClassifier) -> None:
    """ValueError unless `forest` is a fitted binary forest over N_FEATURES histogram bins whose
    trees only point forward to existing nodes and only test existing features."""
    if getattr(forest, "n_features_in_", None) != N_FEATURES or getattr(forest, "n_outputs_", None) != 1:
        raise ValueError(f"not a single-output forest over {N_FEATURES} features")
    if getattr(forest, "n_classes_", None) != 2 or len(np.asarray(getattr(forest, "classes_", []))) != 2:
        raise ValueError("not a two-class forest")
    trees = getattr(forest, "estimators_", None)
    if not isinstance(trees, list) or not trees:
        raise ValueError("a forest without trees")
    for i, est in enumerate(trees):
        tree = getattr(est, "tree_", None)
        if (not isinstance(est, DecisionTreeClassifier) or not isinstance(tree, Tree)
                or getattr(est, "n_features_in_", None) != N_FEATURES or getattr(est, "n_outputs_", None) != 1
                or getattr(est, "n_classes_", None) != 2 or tree.n_features != N_FEATURES or tree.n_outputs != 1
                or list(tree.n_classes) != [2]):
            raise ValueError(f"tree {i} is not a two-class decision tree over {N_FEATURES} features")
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
                or ((feature[inner] < 0) | (feature[inner] >= N_FEATURES)).any()):
            raise ValueError(f"tree {i}: node links or features out of bounds")
