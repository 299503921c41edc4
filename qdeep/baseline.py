"""The seed platform's benchmark model: colour histograms + one Random Forest per label.

scikit-learn style (configure in __init__, learn in fit, answer in predict_proba); no Ray here.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
from PIL import Image
from sklearn.ensemble import RandomForestClassifier

from qdeep import io

N_BINS = 26
KIND = "histogram_rf"
# 256 intensity values -> 26 equal-width bins; PIL counts the 256 values in C, numpy sums runs.
_BIN_STARTS = np.searchsorted((np.arange(256) * N_BINS) // 256, np.arange(N_BINS))


def color_histogram(image: Image.Image) -> np.ndarray:
    """78 features: a 26-bin histogram of each of R, G, B, each normalised to sum to 1."""
    counts = np.fromiter(image.histogram(), dtype=np.int64, count=768).reshape(3, 256)
    hist = np.add.reduceat(counts, _BIN_STARTS, axis=1) / counts[0].sum()
    return hist.reshape(-1).astype(np.float32)


class HistogramForest:
    """One RandomForestClassifier per label; a label constant in training predicts its constant."""

    def __init__(self, n_estimators: int = 200, min_samples_leaf: int = 1, n_jobs: int = -1, random_state: int = 0):
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_jobs = n_jobs
        self.random_state = random_state

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("n_estimators", "min_samples_leaf", "n_jobs", "random_state")}

    def fit(self, x: np.ndarray, y: np.ndarray) -> "HistogramForest":
        self.forests_: list[RandomForestClassifier | float] = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if col.min() == col.max():
                self.forests_.append(float(col[0]))
                continue
            forest = RandomForestClassifier(
                n_estimators=self.n_estimators,
                min_samples_leaf=self.min_samples_leaf,
                n_jobs=self.n_jobs,
                random_state=self.random_state + j,
            )
            self.forests_.append(forest.fit(x, col))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, L) probability of each label."""
        out = np.empty((len(x), len(self.forests_)), dtype=np.float64)
        for j, forest in enumerate(self.forests_):
            out[:, j] = forest if isinstance(forest, float) else forest.predict_proba(x)[:, 1]
        return out

    def save(self, model_dir: Path) -> None:
        joblib.dump(self.forests_, model_dir / "forests.joblib", compress=3)
        io.write_json(model_dir / "config.json", {"kind": KIND, "n_bins": N_BINS, "params": self.get_params()})

    @classmethod
    def load(cls, model_dir: Path) -> "HistogramForest":
        config = json.loads((model_dir / "config.json").read_text())
        model = cls(**config["params"])
        model.forests_ = joblib.load(model_dir / "forests.joblib")
        return model
