"""Validation: how rows are split (hold-out or K folds, seeded), and how predictions are scored.

A validation part is chosen by name (`VALIDATIONS`): `f2` for multi-label tags, `accuracy` for
one class per image. F2 scores are honest: each fold is binarised with thresholds tuned on the *other* folds'
out-of-fold predictions, so no threshold is scored on the rows it was tuned on. The thresholds
kept for prediction are tuned on all out-of-fold rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from qdeep.metrics import binarize, f2_score, per_label_f2, tune_thresholds
from qdeep.registry import Registry

VALIDATIONS: Registry = Registry("validation")


@dataclass
class ValidationResult:
    thresholds: np.ndarray  # (L,) tuned on all out-of-fold rows, for prediction
    f2: float  # cross-fitted: each fold scored with thresholds tuned on the other folds
    per_label_f2: np.ndarray  # (L,) cross-fitted
    fold_f2: list[float]


def _fold_ids(splitter, y: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold index per row from a scikit-learn style splitter of `n_folds` folds."""
    if len(y) < n_folds:
        raise ValueError(f"{len(y)} images cannot be split into {n_folds} folds")
    folds = np.empty(len(y), dtype=np.int64)
    for k, (_, test) in enumerate(splitter.split(np.zeros((len(y), 1)), y)):
        folds[test] = k
    return folds


class KFoldValidation:
    """K folds stratified over all labels at once (iterative stratification), seeded."""

    def __init__(self, n_folds: int = 5, seed: int = 0):
        if n_folds < 2:
            raise ValueError(f"need at least 2 folds, got {n_folds}")
        self.n_folds, self.seed = n_folds, seed

    def split(self, y: np.ndarray) -> np.ndarray:
        """Fold index per row."""
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # scikit-learn: 1 s to import, in every worker

        return _fold_ids(MultilabelStratifiedKFold(n_splits=self.n_folds, shuffle=True, random_state=self.seed),
                         y, self.n_folds)

    def run(self, make_estimator: Callable[[], object], x: np.ndarray, y: np.ndarray, progress=None) -> ValidationResult:
        """Fit one estimator per fold (scikit-learn fit/predict_proba) and score the OOF predictions."""
        folds = self.split(y)
        oof = np.zeros(y.shape, dtype=np.float64)
        for k in range(self.n_folds):
            train, held = folds != k, folds == k
            oof[held] = make_estimator().fit(x[train], y[train]).predict_proba(x[held])
            if progress is not None:
                progress.update(1)
        return self.score(y, oof, folds)

    @staticmethod
    def score(y: np.ndarray, oof: np.ndarray, folds: np.ndarray) -> ValidationResult:
        """Each fold binarised with thresholds tuned on the other folds; kept thresholds use all rows."""
        pred = np.zeros(y.shape, dtype=bool)
        fold_f2 = []
        for k in np.unique(folds):
            held = folds == k
            pred[held] = binarize(oof[held], tune_thresholds(y[~held], oof[~held]))
            fold_f2.append(f2_score(y[held], pred[held]))
        return ValidationResult(thresholds=tune_thresholds(y, oof), f2=f2_score(y, pred),
                                per_label_f2=per_label_f2(y, pred), fold_f2=fold_f2)


@dataclass
class Score:
    """One model's validation result: named metrics (the part's `metric` first), one value per
    label or class, and the thresholds prediction should use (multi-label only)."""

    metrics: dict[str, float]
    per_label: np.ndarray
    thresholds: np.ndarray | None = None


class Validation:
    """A validation part: `folds` splits the rows (seeded), `score` scores a model's probabilities."""

    metric: str  # the score that chooses the best epoch
    per_label_metric: str

    def holdout(self, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
        """True for the held-out rows: one fold of a stratified split, the same for a given seed."""
        return self.folds(y, max(2, round(1 / fraction)), seed) == 0


@VALIDATIONS.register("f2")
class F2Validation(Validation):
    """Multi-label: stratified over all labels at once; mean per-image F2 with per-label thresholds."""

    metric, per_label_metric = "f2", "f2"

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        return KFoldValidation(n_folds, seed).split(y)

    def score(self, y: np.ndarray, proba: np.ndarray) -> Score:
        """Thresholds tuned on all the rows for later use, F2 cross-fitted over 5 interleaved folds
        of them, so none is scored on its own rows."""
        scored = KFoldValidation.score(y, proba, np.arange(len(y)) % 5)
        return Score({"f2": float(scored.f2)}, scored.per_label_f2, scored.thresholds)


@VALIDATIONS.register("accuracy")
class AccuracyValidation(Validation):
    """One class per image: stratified by class; accuracy, macro-F1 and per-class F1 of the argmax."""

    metric, per_label_metric = "accuracy", "f1"

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        import warnings

        from sklearn.model_selection import StratifiedKFold

        with warnings.catch_warnings():  # classes rarer than n_folds: sklearn warns, the split is still valid
            warnings.simplefilter("ignore", UserWarning)
            return _fold_ids(StratifiedKFold(n_folds, shuffle=True, random_state=seed), y, n_folds)

    def score(self, y: np.ndarray, proba: np.ndarray) -> Score:
        from sklearn.metrics import accuracy_score, f1_score

        pred, classes = np.asarray(proba).argmax(1), np.arange(np.asarray(proba).shape[1])
        per_class = f1_score(y, pred, labels=classes, average=None, zero_division=0)
        return Score({"accuracy": float(accuracy_score(y, pred)),
                      "macro_f1": float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))},
                     per_class)
