import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from qdeep.metrics import THRESHOLD_GRID, binarize, f2_score, per_label_f2, tune_thresholds
from qdeep.parts.validation import KFoldValidation

pytestmark = pytest.mark.unit  # no Ray


def _random_labels(rng, n, L, p):
    y = rng.random((n, L)) < p
    y[np.arange(n), rng.integers(0, L, n)] = True  # every row has a true label
    return y


@pytest.mark.parametrize("seed", range(8))
def test_f2_equals_sklearn_samples_average(seed):
    rng = np.random.default_rng(seed)
    n, L = rng.integers(1, 300), rng.integers(1, 20)
    y = _random_labels(rng, n, L, rng.random() * 0.5)
    pred = rng.random((n, L)) < rng.random()
    expected = fbeta_score(y, pred, beta=2, average="samples", zero_division=0)
    assert abs(f2_score(y, pred) - expected) < 1e-9


def test_per_label_f2_equals_sklearn_per_label():
    rng = np.random.default_rng(0)
    y = _random_labels(rng, 200, 9, 0.2)
    pred = rng.random((200, 9)) < 0.3
    pred[:, 4] = False  # a label never predicted scores 0
    expected = fbeta_score(y, pred, beta=2, average=None, zero_division=0)
    np.testing.assert_allclose(per_label_f2(y, pred), expected, atol=1e-12)
    assert per_label_f2(y, pred)[4] == 0


def test_thresholds_beat_flat_half_on_underconfident_labels():
    rng = np.random.default_rng(1)
    y = _random_labels(rng, 2000, 6, 0.25)
    # A model whose scores rank well but sit low for positives of labels 0-2 (say rare labels).
    proba = np.where(y, 0.55, 0.05) + rng.normal(0, 0.1, y.shape)
    proba[:, :3] *= 0.5
    proba = proba.clip(0, 1)
    thresholds = tune_thresholds(y, proba)
    assert f2_score(y, binarize(proba, thresholds)) > f2_score(y, proba >= 0.5) + 0.05
    assert (thresholds[:3] < 0.3).all()


def test_thresholds_are_coordinate_optimal_on_the_grid():
    """No single label's threshold can be moved to another grid value and raise F2."""
    rng = np.random.default_rng(2)
    y = _random_labels(rng, 300, 5, 0.3)
    proba = (0.35 * y + 0.65 * rng.random(y.shape)).clip(0, 1)
    thresholds = tune_thresholds(y, proba, passes=10)
    best = f2_score(y, binarize(proba, thresholds))
    for j in range(5):
        for t in THRESHOLD_GRID:
            trial = thresholds.copy()
            trial[j] = t
            assert f2_score(y, binarize(proba, trial)) <= best + 1e-12


def test_validation_scores_each_fold_with_thresholds_from_the_other_folds():
    rng = np.random.default_rng(3)
    y = _random_labels(rng, 400, 4, 0.3).astype(np.uint8)
    oof = (0.3 * y + 0.7 * rng.random(y.shape)).clip(0, 1)
    cv = KFoldValidation(4, seed=0)
    folds = cv.split(y)
    assert np.bincount(folds, minlength=4).min() >= 80  # every row in one fold, folds near-equal
    result = cv.score(y, oof, folds)
    pred = np.zeros(y.shape, dtype=bool)
    for k in range(4):
        pred[folds == k] = binarize(oof[folds == k], tune_thresholds(y[folds != k], oof[folds != k]))
    assert result.f2 == pytest.approx(f2_score(y, pred), abs=1e-12)
    np.testing.assert_allclose(result.thresholds, tune_thresholds(y, oof))
    # Scoring on the tuning rows themselves would flatter the model; the honest score cannot exceed it.
    assert result.f2 <= f2_score(y, binarize(oof, result.thresholds)) + 1e-12
