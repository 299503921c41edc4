"""The histogram forest on multiband GeoTIFFs (`qdeep baseline --image-format tif`): every band's
histogram on its range, spectral indices, the features saved with the model for `qdeep predict`;
bad GeoTIFFs meet the bad-input policy naming the file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from qdeep.baseline import FEATURES_FILE, N_BINS, BandHistograms, band_histograms
from qdeep.cli import main
from qdeep.data.images import ImageDecodeError
from qdeep.data.rasters import Raster, write_geotiff
from qdeep.data.synth import write_synthetic_planet
from qdeep.errors import QdeepError


@pytest.mark.unit
def test_band_histograms_of_a_raster(planet4, tmp_path):
    paths = sorted((planet4 / "train-tif-v2").glob("*.tif"))
    spec = band_histograms(paths, "r,g,b,nir", "ndvi,ndwi")
    assert spec.bands == (2, 1, 0, 3) and spec.indices == ("ndvi", "ndwi") and spec.count == 4
    assert spec.dtype == "uint16" and spec.n_features == 6 * N_BINS and spec.names == ("b", "g", "r", "nir")
    assert all(lo < hi for lo, hi in zip(spec.low, spec.high)) and max(spec.high) > 255  # 16-bit counts
    bands = np.zeros((4, 4, 4), dtype=np.uint16)
    bands[2], bands[3] = 1000, 3000  # red 1000, NIR 3000: NDVI 0.5 everywhere
    x = spec(Raster(bands))
    assert x.shape == (6 * N_BINS,) and x.dtype == np.float32
    np.testing.assert_allclose(x.reshape(6, N_BINS).sum(axis=1), 1.0, rtol=1e-6)
    ndvi = x.reshape(6, N_BINS)[4]
    assert ndvi[int((0.5 + 1) / 2 * N_BINS)] == 1.0  # all in the bin of 0.5 on [-1, 1]
    with pytest.raises(ImageDecodeError, match=f"has 3 band\\(s\\) of uint16; the training set's first image {paths[0]}"):
        spec(Raster(np.zeros((3, 4, 4), dtype=np.uint16)))
    spec.save(tmp_path)
    assert BandHistograms.load(tmp_path / FEATURES_FILE) == spec
    (tmp_path / FEATURES_FILE).write_text(json.dumps({**json.loads((tmp_path / FEATURES_FILE).read_text()),
                                                      "bands": [7]}))
    with pytest.raises(QdeepError, match="not the features of a `qdeep baseline` multiband model"):
        BandHistograms.load(tmp_path / FEATURES_FILE)
    with pytest.raises(QdeepError, match="unknown index 'evi'"):
        band_histograms(paths, None, "evi")
    six = tmp_path / "six.tif"
    write_geotiff(six, np.ones((6, 8, 8), dtype=np.uint16))
    assert band_histograms([six], "6,1").bands == (5, 0)
    with pytest.raises(QdeepError, match="--indices ndvi needs the nir and r band"):
        band_histograms([six], None, "ndvi")


@pytest.mark.unit
def test_band_options_are_refused_without_the_tif_format(planet4, tmp_path, capsys):
    assert main(["baseline", "--data", str(planet4), "--bands", "r,g,b", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("--bands and --indices are for multiband images: add --image-format tif")
    (tmp_path / "jpg-only").mkdir()
    for name in ("train_v2.csv", "test_solution_v2.csv"):
        (tmp_path / "jpg-only" / name).write_bytes((planet4 / name).read_bytes())
    (tmp_path / "jpg-only" / "train-jpg").mkdir()
    assert main(["baseline", "--data", str(tmp_path / "jpg-only"), "--image-format", "tif",
                 "--out", str(tmp_path / "o")]) == 2
    assert "jpg-only: no train-tif-v2/ folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_baseline_on_every_band_and_ndvi_then_predict_from_the_geotiffs(planet4, ray_cluster, tmp_path, sqlite_uri):
    out = tmp_path / "out"
    assert main(["baseline", "--data", str(planet4), "--image-format", "tif", "--indices", "ndvi,ndwi",
                 "--folds", "2", "--trees", "20", "--out", str(out), "--tracking-uri", sqlite_uri]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 60 and metrics["n_test"] == 8 and 0 < metrics["f2_oof"] <= 1
    assert metrics["image_format"] == "tif" and metrics["n_features"] == 6 * N_BINS
    features = json.loads((out / "model" / FEATURES_FILE).read_text())
    assert features["bands"] == [0, 1, 2, 3] and features["indices"] == ["ndvi", "ndwi"]
    assert json.loads((out / "model" / "config.json").read_text())["kind"] == "histogram_rf"
    submitted = list(csv.reader(open(out / "submission.csv")))
    assert len(submitted) == 9 and {row[0] for row in submitted[1:]} == {f"test_{i}" for i in range(8)}
    sub = tmp_path / "sub.csv"  # the model reads test-tif-v2/ (it was trained on GeoTIFFs)
    assert main(["predict", "--model", str(out / "model"), "--data", str(planet4), "--out", str(sub)]) == 0
    assert sub.read_text() == (out / "submission.csv").read_text()


@pytest.mark.ray
def test_a_geotiff_with_other_bands_or_corrupt_is_bad_input_naming_it(planet4, ray_cluster, tmp_path, sqlite_uri,
                                                                      capsys):
    data = tmp_path / "data"
    write_synthetic_planet(data, n=20, size=32, seed=3, n_test=2, bands=4)
    write_geotiff(data / "train-tif-v2" / "train_7.tif", np.ones((3, 32, 32), dtype=np.uint16))
    (data / "train-tif-v2" / "train_9.tif").write_bytes(b"II*\x00 not really a tiff")
    args = ["baseline", "--data", str(data), "--image-format", "tif", "--bands", "r,g,b,nir", "--folds", "2",
            "--trees", "10", "--tracking-uri", sqlite_uri]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "qdeep: error:" in line]  # besides progress bars
    assert len(error) == 1 and "train_7.tif: has 3 band(s) of uint16; the training set's first image" in error[0], error
    assert not (tmp_path / "stop").exists()
    assert main([*args, "--on-bad-image", "skip", "--out", str(tmp_path / "skip")]) == 0
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in metrics["skipped"]}
    assert metrics["n_images"] == 18 and metrics["n_skipped"] == 2
    assert reasons["train_7.tif"].startswith("has 3 band(s) of uint16; the training set's first image")
    assert reasons["train_9.tif"].startswith("cannot decode TIFF")
