"""The histogram features and forests as plain functions, then `qdeep baseline` / `qdeep predict`
end to end on real JPEGs with a real local Ray and a real MLflow store."""

import csv
import json
import shutil

import mlflow
import numpy as np
import pytest
from PIL import Image

from qdeep.baseline import HistogramForest, color_histogram
from qdeep.cli import main
from qdeep.metrics import f2_score
from qdeep.parts.targets import MultiLabelTargets


def test_color_histogram_has_78_values_each_channel_summing_to_one():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    h = color_histogram(Image.fromarray(arr))
    assert h.shape == (78,) and h.dtype == np.float32
    np.testing.assert_allclose(h.reshape(3, 26).sum(1), 1.0, rtol=1e-6)
    for c in range(3):  # equal-width bins over 0..255, as numpy would count them
        expected = np.histogram(arr[..., c], bins=26, range=(0, 256))[0] / arr[..., c].size
        np.testing.assert_allclose(h[26 * c : 26 * (c + 1)], expected, atol=1e-7)


def test_color_histogram_of_a_pure_colour():
    h = color_histogram(Image.new("RGB", (8, 8), (255, 0, 128))).reshape(3, 26)
    assert h[0, 25] == 1 and h[1, 0] == 1 and h[2, 13] == 1


def test_histogram_forest_learns_and_handles_constant_labels():
    rng = np.random.default_rng(0)
    x = rng.random((200, 78)).astype(np.float32)
    y = np.stack([x[:, 0] > 0.5, np.zeros(200, bool), np.ones(200, bool)], axis=1).astype(np.uint8)
    model = HistogramForest(n_estimators=20, n_jobs=1).fit(x[:150], y[:150])
    proba = model.predict_proba(x[150:])
    assert proba.shape == (50, 3)
    assert ((proba[:, 0] > 0.5) == y[150:, 0]).mean() > 0.9
    assert (proba[:, 1] == 0).all() and (proba[:, 2] == 1).all()


def test_histogram_forest_is_a_scikit_learn_estimator():
    """get_params/set_params/clone come from BaseEstimator; bad input fails in fit, not __init__."""
    from sklearn.base import clone

    model = HistogramForest(n_estimators=5, n_jobs=1)
    assert model.get_params() == {"n_estimators": 5, "min_samples_leaf": 1, "n_jobs": 1, "random_state": 0}
    assert model.set_params(min_samples_leaf=3, random_state=7) is model
    copy = clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    rng = np.random.default_rng(0)
    x = rng.random((40, 78)).astype(np.float32)
    y = np.stack([x[:, 0] > 0.5, x[:, 1] > 0.5], axis=1).astype(np.uint8)
    copy.fit(x, y)
    assert copy.forests_[0].min_samples_leaf == 3 and not hasattr(clone(copy), "forests_")
    with pytest.raises(ValueError):
        HistogramForest().fit(x, y[:30])
    with pytest.raises(ValueError):
        HistogramForest().fit(x, y[:, 0])


def test_targets_round_trip():
    targets = MultiLabelTargets.from_tags([["water", "clear"], ["haze"]])
    assert targets.vocabulary == ["clear", "haze", "water"]
    y = targets.encode([["water", "clear"], []])
    assert y.tolist() == [[1, 0, 1], [0, 0, 0]]
    assert targets.decode(y) == ["clear water", ""]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_baseline_end_to_end_then_predict(planet_dir, ray_cluster, tmp_path, sqlite_uri, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["baseline", "--data", str(planet_dir), "--folds", "3", "--trees", "40", "--out", str(out),
            "--tracking-uri", sqlite_uri]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "F2 (out-of-fold)" in printed and "cloudy" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    vocab = json.loads((out / "model" / "labels.json").read_text())["labels"]
    assert vocab == sorted(vocab) and len(vocab) == 17
    assert set(metrics["per_label_f2"]) == set(metrics["thresholds"]) == set(vocab)
    assert metrics["n_images"] == 240 and metrics["n_skipped"] == 0 and metrics["skipped"] == []
    assert 0.75 < metrics["f2_oof"] <= 1
    for colour_tag in ("cloudy", "clear", "primary"):  # colour tags are learnable from histograms
        assert metrics["per_label_f2"][colour_tag] > 0.9, colour_tag
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json", "forests.skops", "labels.json", "thresholds.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers

    # Submission: Kaggle format, one row per test image in sample-submission order, known tags only.
    rows = _read_csv(out / "submission.csv")
    sample = _read_csv(planet_dir / "sample_submission_v2.csv")
    assert rows[0] == ["image_name", "tags"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in sample[1:]]
    assert all(set(r[1].split()) <= set(vocab) for r in rows[1:])
    truth = {r[0]: r[1].split() for r in _read_csv(planet_dir / "test_solution_v2.csv")[1:]}
    targets = MultiLabelTargets(vocab)
    names = [r[0] for r in rows[1:]]
    test_f2 = f2_score(targets.encode([truth[n] for n in names]), targets.encode([r[1].split() for r in rows[1:]]))
    assert test_f2 > 0.7

    # MLflow: the run, its parameters, metrics and artifacts are in the store.
    mlflow.set_tracking_uri(sqlite_uri)
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["folds"] == "3" and run.data.params["trees"] == "40"
    assert run.data.metrics["f2_oof"] == pytest.approx(metrics["f2_oof"], abs=1e-6)
    assert run.data.metrics["f2_cloudy"] == pytest.approx(metrics["per_label_f2"]["cloudy"], abs=1e-6)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "thresholds.json", "per_label_f2.png", "submission.csv"} <= artifacts

    # predict: the saved model over a plain image folder reproduces the baseline's submission.
    predicted = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(out / "model"), "--images", str(planet_dir / "test-jpg"),
                 "--out", str(predicted)]) == 0
    pred_rows = _read_csv(predicted)
    assert pred_rows[0] == ["image_name", "tags"]
    assert sorted(pred_rows[1:]) == sorted(rows[1:])
    # ... and over the Planet test split given as a relative path, in sample-submission order.
    monkeypatch.chdir(planet_dir.parent)
    assert main(["predict", "--model", str(out / "model"), "--data", planet_dir.name, "--out", "pred2.csv"]) == 0
    assert _read_csv(planet_dir.parent / "pred2.csv") == rows


def _copy_with_bad_inputs(planet_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(planet_dir, data)
    (data / "train-jpg" / "train_5.jpg").write_bytes(b"\xff\xd8\xff garbage")  # corrupt JPEG
    (data / "train-jpg" / "train_9.jpg").unlink()  # CSV row without image
    return data


def test_bad_inputs_stop_with_one_error_naming_the_file(planet_dir, ray_cluster, tmp_path, sqlite_uri, capsys):
    data = _copy_with_bad_inputs(planet_dir, tmp_path)
    (data / "train-jpg" / "train_9.jpg").write_bytes((data / "train-jpg" / "train_8.jpg").read_bytes())
    out = tmp_path / "out"
    code = main(["baseline", "--data", str(data), "--folds", "3", "--trees", "5", "--out", str(out),
                 "--tracking-uri", sqlite_uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("qdeep: error: ") and "train_5.jpg: cannot decode image" in err[-1]
    assert not (out / "metrics.json").exists() and not (out / "model").exists()


def test_skip_counts_and_reports_bad_inputs(planet_dir, ray_cluster, tmp_path, sqlite_uri):
    data = _copy_with_bad_inputs(planet_dir, tmp_path)
    out = tmp_path / "out"
    assert main(["baseline", "--data", str(data), "--folds", "3", "--trees", "5", "--out", str(out),
                 "--tracking-uri", sqlite_uri, "--on-bad-image", "skip"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 238 and metrics["n_skipped"] == 2
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in metrics["skipped"]}
    assert reasons["train_v2.csv:11"] == f"image 'train_9' not found in {data / 'train-jpg'}"
    assert reasons["train_5.jpg"].startswith("cannot decode image")
    mlflow.set_tracking_uri(sqlite_uri)
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["n_skipped"] == 2
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json",
                                                dst_path=str(tmp_path / "dl"))
    assert json.loads(open(local).read())["skipped"] == metrics["skipped"]
