"""The Kaggle Planet score (mean per-image F2) and per-label decision thresholds.

Plain functions on numpy arrays: no Ray, no torch, so they are cheap to test and reuse.
"""

from __future__ import annotations

import numpy as np

BETA2 = 4.0  # beta = 2: recall weighs four times as much as precision
THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


def _f2(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F2 from counts, 0 where undefined (sklearn's zero_division=0)."""
    num = (1.0 + BETA2) * tp
    den = num + BETA2 * fn + fp
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _counts(y: np.ndarray, pred: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives of boolean arrays, summed along `axis`."""
    return (y & pred).sum(axis), (~y & pred).sum(axis), (y & ~pred).sum(axis)


def f2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over images of F-beta (beta=2): the Kaggle Planet leaderboard score."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"y_true and y_pred must be equal-shaped 2-D arrays, got {y_true.shape} and {y_pred.shape}")
    return float(_f2(*_counts(y_true, y_pred, axis=1)).mean())


def per_label_f2(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """One F2 per label (column), 0 where a label is never true nor predicted; for reports."""
    return _f2(*_counts(np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool), axis=0))


def binarize(proba: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.asarray(proba) >= np.asarray(thresholds)[None, :]


def tune_thresholds(y_true: np.ndarray, proba: np.ndarray, grid: np.ndarray = THRESHOLD_GRID, passes: int = 3,
                    start: float = 0.2) -> np.ndarray:
    """Per-label thresholds maximising `f2_score`, by coordinate ascent over `grid`.

    Holding the other labels fixed, each image's F2 takes one of two values, label j on or off;
    the score of every candidate threshold is then one weighted bincount and a cumulative sum,
    O(n) per label. Use out-of-fold (or validation) probabilities, never the rows scored on.
    """
    y = np.asarray(y_true, dtype=bool)
    proba = np.asarray(proba, dtype=np.float64)
    if y.shape != proba.shape or y.ndim != 2:
        raise ValueError(f"y_true and proba must be equal-shaped 2-D arrays, got {y.shape} and {proba.shape}")
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    # k[i, j]: how many grid values are <= proba[i, j], i.e. label j is on for grid[:k].
    k = np.searchsorted(grid, proba, side="right")
    thresholds = np.full(y.shape[1], start)
    pred = proba >= thresholds
    tp, fp, fn = _counts(y, pred, axis=1)
    best = _f2(tp, fp, fn).mean()
    for _ in range(passes):
        improved = False
        for j in range(y.shape[1]):
            yj, pj = y[:, j], pred[:, j]
            tp0, fp0, fn0 = tp - (yj & pj), fp - (~yj & pj), fn - (yj & ~pj)  # the counts without label j
            f_on = _f2(tp0 + yj, fp0 + ~yj, fn0)
            f_off = _f2(tp0, fp0, fn0 + yj)
            gain = np.bincount(k[:, j], weights=f_on - f_off, minlength=len(grid) + 1)
            scores = (f_off.sum() + np.cumsum(gain[::-1])[::-1][1:]) / len(y)
            g = int(np.argmax(scores))
            if scores[g] > best + 1e-12:
                best, improved = scores[g], True
                thresholds[j] = grid[g]
                pred[:, j] = proba[:, j] >= grid[g]
                tp, fp, fn = tp0 + (yj & pred[:, j]), fp0 + (~yj & pred[:, j]), fn0 + (yj & ~pred[:, j])
        if not improved:
            break
    return thresholds
