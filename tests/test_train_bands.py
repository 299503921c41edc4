"""CNNs on multiband GeoTIFFs on a real local Ray (`--image-format tif`): train and predict on every
band, the ladder's RGB vs all-bands rungs, DeepCluster over the bands; a file of other bands is bad
input naming it."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qdeep.cli import main
from qdeep.data.rasters import write_geotiff

pytestmark = pytest.mark.ray

SMALL = ["--image-size", "32", "--batch-size", "16", "--loader-workers", "0", "--epochs", "1", "--workers", "1"]
PLANET = ["--image-format", "tif", "--bands", "r,g,b,nir"]


def test_train_on_every_band_then_predict_from_the_geotiffs(planet4, ray_cluster, tmp_path, sqlite_uri, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", str(planet4), *PLANET, "--band-init", "mean", "--arch", "resnet18",
                 "--freeze", "last:1", "--out", str(out), "--tracking-uri", sqlite_uri, *SMALL]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["image_format"] == "tif" and config["band_init"] == "mean" and config["in_chans"] == 4
    assert config["bands"]["names"] == ["r", "g", "b", "nir"] and config["bands"]["index"] == [2, 1, 0, 3]
    state = torch.load(out / "model" / "model.pt", weights_only=True)
    assert state["conv1.weight"].shape == (64, 4, 7, 7)
    # the frozen stem's adapted first convolution trained with the last block and the head
    trainable = json.loads((out / "metrics.json").read_text())["history"][0]["trainable_params"]
    layer4_and_head = sum(v.numel() for k, v in state.items() if k.startswith(("layer4.", "fc.")) and "running" not in k
                          and "num_batches" not in k)
    assert trainable == layer4_and_head + state["conv1.weight"].numel()

    submission = tmp_path / "sub.csv"
    assert main(["predict", "--model", str(out / "model"), "--data", str(planet4), "--out", str(submission),
                 "--tta"]) == 0
    rows = list(csv.reader(open(submission)))
    sample = list(csv.reader(open(planet4 / "sample_submission_v2.csv")))
    assert [r[0] for r in rows[1:]] == [r[0] for r in sample[1:]]  # the images of test-tif-v2/
    images = tmp_path / "images"
    shutil.copytree(planet4 / "test-tif-v2", images)
    write_geotiff(images / "rgb_only.tif", np.ones((3, 32, 32), dtype=np.uint16))
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "model"), "--images", str(images), "--out",
                 str(tmp_path / "p.csv"), "--on-bad-image", "skip"]) == 0
    said = capsys.readouterr().out
    assert "wrote 8 predictions to" in said and "(1 skipped)" in said
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 8


def test_a_geotiff_of_other_bands_stops_training_naming_it(planet4, ray_cluster, tmp_path, sqlite_uri, capsys):
    data = tmp_path / "data"
    shutil.copytree(planet4, data)
    write_geotiff(data / "train-tif-v2" / "train_7.tif", np.ones((3, 32, 32), dtype=np.uint16))
    assert main(["train", "--data", str(data), "--image-format", "tif", "--out", str(tmp_path / "o"),
                 "--tracking-uri", sqlite_uri, *SMALL]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "qdeep: error:" in line]
    assert len(error) == 1 and "train_7.tif: has 3 band(s) of uint16; the training set's first image" in error[0]
    assert not (tmp_path / "o").exists()
    assert main(["train", "--data", str(planet4), "--bands", "nir", "--out", str(tmp_path / "o")]) == 2
    assert "--bands is for multiband images: add --image-format tif" in capsys.readouterr().err


def test_ladder_adds_all_band_rungs_to_the_rgb_ones(planet4, ray_cluster, tmp_path, sqlite_uri):
    out = tmp_path / "ladder"
    assert main(["ladder", "--data", str(planet4), *PLANET, "--band-init", "zero", "--arch", "efficientnet_lite0",
                 "--scratch-arch", "resnet18", "--trees", "20", "--lr", "3e-3", "--out", str(out),
                 "--tracking-uri", sqlite_uri, *SMALL]) == 0
    with open(out / "ladder.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["histogram_rf", "histogram_rf_all_bands", "scratch", "frozen", "finetune",
                                         "finetune_all_bands"]
    assert all(0 < float(r["f2"]) <= 1 for r in rows)

    def bands(rung):
        return json.loads((out / rung / "model" / "config.json").read_text())["bands"]["names"]

    assert bands("frozen") == bands("finetune") == ["r", "g", "b"] and bands("finetune_all_bands") == [
        "r", "g", "b", "nir"]
    state = torch.load(out / "finetune_all_bands" / "model" / "model.pt", weights_only=True)
    assert state["conv_stem.weight"].shape[1] == 4  # the frozen rung's network, its stem adapted


def test_deepcluster_over_every_band(planet4, ray_cluster, tmp_path, sqlite_uri):
    out = tmp_path / "dc"
    assert main(["deepcluster", "--images", str(planet4 / "train-tif-v2"), "--data", str(planet4), *PLANET,
                 "--band-init", "parallel", "--k", "3", "--final-k", "3", "--iterations", "1", "--image-size", "32",
                 "--batch-size", "16", "--loader-workers", "0", "--workers", "1", "--out", str(out),
                 "--tracking-uri", sqlite_uri]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["iterations"]) == 1 and metrics["n_images"] == 60 and "nmi_true" in metrics["final"]
    state = torch.load(out / "iterations" / "iter_01" / "model.pt", weights_only=True)
    assert state["conv_stem.extra.weight"].shape[1] == 1  # the NIR band's own convolution
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["model"]["bands"] == ["r", "g", "b", "nir"] and manifest["total_rows"] == 60
    assert pq.read_table(out / "assignments.parquet").num_rows == 60
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"cluster_{c:02d}.png" for c in range(3)]
    # the report: the groups profiled on their pictures' RGB, the saliency of the 4-band network
    groups = json.loads((out / "profiles" / "profiles.json").read_text())["groups"]
    assert len(groups) == len(set(pq.read_table(out / "assignments.parquet")["cluster"].to_pylist()))
    for g in groups:
        with Image.open(out / "profiles" / f"saliency_{g['group']:02d}.png") as strip:
            assert strip.size == (min(4, g["size"]) * 128, 128) and np.asarray(strip).std() > 0


def test_a_pack_of_geotiffs_trains_predicts_and_fits_the_forest(planet4, ray_cluster, tmp_path, sqlite_uri, capsys):
    pack = tmp_path / "pack"
    assert main(["pack", "--data", str(planet4), "--image-format", "tif", "--out", str(pack)]) == 0
    manifest = json.loads((pack / "pack.json").read_text())
    assert manifest["image_format"] == "tif" and manifest["bands"]["count"] == 4
    assert manifest["counts"] == {"train": 60, "test": 8, "skipped": 0}
    capsys.readouterr()
    assert main(["train", "--data", str(pack), "--out", str(tmp_path / "no"), "--tracking-uri", sqlite_uri]) == 2
    assert "a pack of tif images, not jpg (add --image-format tif)" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["train", "--data", str(pack), *PLANET, "--arch", "resnet18", "--out", str(out),
                 "--tracking-uri", sqlite_uri, *SMALL]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["bands"]["names"] == ["r", "g", "b", "nir"] and config["bands"]["first"].startswith(f"{pack}:")
    assert main(["predict", "--model", str(out / "model"), "--data", str(pack), "--out", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert [r[0] for r in rows[1:]] == [f"test_{i}" for i in range(8)]
    assert main(["baseline", "--data", str(pack), "--image-format", "tif", "--indices", "ndvi", "--folds", "2",
                 "--trees", "10", "--out", str(tmp_path / "forest"), "--tracking-uri", sqlite_uri]) == 0
    forest = json.loads((tmp_path / "forest" / "metrics.json").read_text())
    assert forest["n_images"] == 60 and forest["n_test"] == 8 and forest["n_features"] == 5 * 26
