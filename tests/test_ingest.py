"""The training input: what a worker makes of the rows Ray Data streams it (`Decoder`), the pack
join and the uniform resampling that run as Ray Data tasks, and the run's config, which no longer
grows with the number of images. The streaming itself runs in the training tests (tests/test_train.py,
the pack test below, the two-node tests)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from qdeep.config import TrainConfig
from qdeep.data import BadInputPolicy
from qdeep.data.inputs import RGBInput
from qdeep.data.loader import Decoder
from qdeep.data.pack import Pack, Row, write_manifest, write_shard
from qdeep.data.synth import write_synthetic_classes
from qdeep.distributed.ingest import _column, _read_and_join, _resample, uniform_rates, without_a_lone_row
from qdeep.distributed.prepare import TrainingData, loop_config
from qdeep.parts.targets import MultiClassTargets, MultiLabelTargets

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    write_synthetic_classes(root, n_per_class=4, size=40, seed=1)
    return sorted(str(p) for p in root.rglob("*.jpg"))


def _batch(paths, refs=None):
    return {"row": np.arange(len(paths)), "ref": np.array(refs if refs is not None else paths, dtype=object),
            "y": np.arange(len(paths)) % 3}


@pytest.mark.unit
def test_bytes_and_paths_decode_alike_inline_or_in_threads(images):
    paths = images[:6]
    data = [open(p, "rb").read() for p in paths]
    inline = list(Decoder(RGBInput(32, MEAN, STD), y_dtype=np.int64)([_batch(paths)]))
    threaded = list(Decoder(RGBInput(32, MEAN, STD), threads=2, y_dtype=np.int64)([_batch(paths, data)]))
    (rows, x, y), (rows2, x2, y2) = inline[0], threaded[0]
    assert x.pixels.shape == (6, 32, 32, 3) and x.pixels.dtype == torch.uint8  # finished on the device
    x, x2 = x.to("cpu"), x2.to("cpu")
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(rows, rows2) and torch.equal(y, y2) and y.dtype == torch.int64
    assert torch.equal(x, x2)


@pytest.mark.unit
def test_batches_come_out_in_order_one_decoded_ahead(images):
    batches = [_batch(images[i:i + 3]) for i in range(0, 9, 3)]
    for b, start in zip(batches, range(0, 9, 3)):
        b["row"] = np.arange(start, start + 3)
    out = list(Decoder(RGBInput(24, MEAN, STD), threads=2)(iter(batches)))
    assert [r.tolist() for r, _, _ in out] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.mark.unit
def test_augmentation_is_drawn_per_epoch_and_row(images):
    decode = Decoder(RGBInput(32, MEAN, STD), train=True, crop=0.5, seed=3, threads=2)
    batch = _batch(images[:8])
    first = next(decode([batch], epoch=0))[1]
    again = next(decode([batch], epoch=0))[1]
    later = next(decode([batch], epoch=1))[1]
    assert torch.equal(first, again)  # the same (seed, epoch, row): the same crop and flips
    assert not torch.equal(first, later)


@pytest.mark.unit
def test_uniform_resampling_evens_out_the_classes():
    y = np.array([0] * 800 + [1] * 150 + [2] * 50)
    rates = uniform_rates(y)
    batch = {"row": np.arange(len(y)), "y": y, "ref": np.array([f"r{i}" for i in range(len(y))], dtype=object)}
    counts = np.zeros(3)
    for _ in range(20):  # 20 epochs
        out = _resample(batch, rates)
        assert all(len(v) == len(out["row"]) for v in out.values())
        assert (out["ref"] == np.array([f"r{i}" for i in out["row"]], dtype=object)).all()  # rows stay whole
        counts += np.bincount(out["y"], minlength=3)
    per_epoch = counts / 20
    assert np.allclose(per_epoch, len(y) / 3, rtol=0.1), per_epoch  # about n / classes each
    assert uniform_rates(np.array([0, 0, 2]))[1] == 0  # an absent class is never drawn


@pytest.mark.unit
def test_a_pack_shard_is_joined_to_its_targets_by_image_name(images, tmp_path):
    rows = [Row(f"img{i}", p, "train", ["a"], f"x.csv:{i + 2}") for i, p in enumerate(images[:5])]
    listing, failures = write_shard(str(tmp_path), 0, rows)
    assert not failures
    write_manifest(str(tmp_path), [listing], "test", "labels-csv", ["a"], [])
    pack = Pack(str(tmp_path))
    y = np.eye(4, dtype=np.float32)[[3, 1]]  # rows 0 and 1 of this split: img3 and img1
    wanted = pa.table({"row": [0, 1], "image": ["img3", "img1"], "y": _column(y)})
    out = _read_and_join({"shard": np.array(pack.files(), dtype=object)}, pack, wanted)
    by_row = {r: (ref, y) for r, ref, y in zip(out["row"].to_pylist(), out["ref"].to_pylist(),
                                               out["y"].to_numpy(zero_copy_only=False))}
    assert sorted(by_row) == [0, 1]  # the other images are not in this split
    assert by_row[0][0] == open(images[3], "rb").read() and by_row[1][0] == open(images[1], "rb").read()
    assert np.array_equal(np.stack([by_row[0][1], by_row[1][1]]), y)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_the_run_config_does_not_grow_with_the_number_of_images(kind):
    def config_bytes(n: int) -> int:
        rng = np.random.default_rng(0)
        if kind == "multilabel":
            targets = MultiLabelTargets(["a", "b", "c"])
            y = (rng.random((n, 3)) < 0.5).astype(np.float32)
        else:
            targets = MultiClassTargets(["a", "b", "c"])
            y = rng.integers(0, 3, n)
        data = TrainingData(targets, [f"/data/img_{i}.jpg" for i in range(n)], y, rng.random(n) < 0.2,
                            BadInputPolicy(), "test", targets.validation)
        config = loop_config(TrainConfig(task=kind, balance="weights"), data, None, None)
        config.pop("launch_id")
        assert max(len(v) for v in config.values() if isinstance(v, list)) <= 3  # per label at most
        return len(json.dumps(config))

    assert config_bytes(100_000) - config_bytes(100) < 40  # a few more digits in the counts and weights


TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--loader-workers", "2",
        "--warmup-steps", "2", "--lr", "3e-3", "--workers", "2"]


def test_a_last_training_batch_of_one_row_is_dropped():
    """BatchNorm refuses one row in training ("Expected more than 1 value per channel"): a clean run
    of the suite met it when a uniform epoch's share came out at 1 more than a whole number of batches."""
    sizes = lambda n, b: [len(x["row"]) for x in without_a_lone_row(({"row": np.arange(min(b, n - i))}
                                                                     for i in range(0, n, b)), b)]
    assert sizes(33, 16) == [16, 16] and sizes(34, 16) == [16, 16, 2] and sizes(1, 16) == []
    assert sizes(3, 1) == [1, 1, 1]  # --batch-size 1 trains on single rows (with no BatchNorm, say)


@pytest.mark.ray
def test_training_from_a_pack_streams_every_class_uniformly(ray_cluster, tmp_path, sqlite_uri):
    """`qdeep pack` a folder per class, then `qdeep train --data PACK --balance uniform`: the task
    comes from the pack (multiclass), the rows from its shards, and every validation row is scored."""
    from qdeep.cli import main

    classes = tmp_path / "classes"
    write_synthetic_classes(classes, n_per_class=30, size=40, seed=2)
    pack, out = tmp_path / "pack", tmp_path / "out"
    assert main(["pack", "--images", str(classes), "--out", str(pack), "--shard-mb", "1"]) == 0
    assert main(["--plugin", "qdeep_test_hooks", "train", "--data", str(pack), "--out", str(out), "--tracking-uri",
                 sqlite_uri, "--balance", "uniform", "--epochs", "2", *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    n = len(list(classes.rglob("*.jpg")))
    assert m["task"] == "multiclass" and m["n_train"] + m["n_val"] == n
    assert m["epochs_completed"] == 2 and all(h["ranks_in_sync"] == 1.0 for h in m["history"])
    assert 0.0 <= m["val_accuracy"] <= 1.0
    labels = json.loads((out / "model" / "labels.json").read_text())
    assert sorted(labels["labels"]) == sorted(p.name for p in classes.iterdir())


@pytest.mark.ray
def test_a_planet_pack_trains_and_predicts_its_test_split_as_the_folder_does(ray_cluster, planet_dir, tmp_path,
                                                                              sqlite_uri):
    """`train --data PACK` then `predict --data PACK`: the submission names the pack's test images in
    the folder's order, with the same predictions as `predict --data FOLDER` (the same bytes)."""
    from qdeep.cli import main

    pack, out = tmp_path / "pack", tmp_path / "out"
    assert main(["pack", "--data", str(planet_dir), "--out", str(pack), "--shard-mb", "1"]) == 0
    assert main(["train", "--data", str(pack), "--out", str(out), "--tracking-uri", sqlite_uri, "--epochs", "1",
                 *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "multilabel" and m["epochs_completed"] == 1
    from_pack, from_folder = tmp_path / "pack.csv", tmp_path / "folder.csv"
    assert main(["predict", "--model", str(out / "model"), "--data", str(pack), "--out", str(from_pack)]) == 0
    assert main(["predict", "--model", str(out / "model"), "--data", str(planet_dir), "--out", str(from_folder)]) == 0
    rows = from_pack.read_text().splitlines()
    assert rows == from_folder.read_text().splitlines() and len(rows) > 1

    # The baseline's histograms of the pack's images are those of the folder's files, image by image.
    from qdeep.baseline import color_histogram
    from qdeep.data import load_dataset
    from qdeep.distributed.tasks import image_features

    packed, folder = (load_dataset(BadInputPolicy("error"), data=d) for d in (str(pack), planet_dir))
    x_pack, _ = image_features(color_histogram, packed.train, BadInputPolicy("error"), "h", packed.pack)
    x_folder, _ = image_features(color_histogram, folder.train, BadInputPolicy("error"), "h")
    assert packed.train.names != folder.train.names  # packed in a shuffled order
    assert np.array_equal(x_pack, x_folder[[folder.train.names.index(n) for n in packed.train.names]])
    rf = tmp_path / "rf"
    assert main(["baseline", "--data", str(pack), "--out", str(rf), "--folds", "2", "--trees", "5",
                 "--tracking-uri", sqlite_uri]) == 0
    names = [line.split(",")[0] for line in (rf / "submission.csv").read_text().splitlines()[1:]]
    assert names == [line.split(",")[0] for line in rows[1:]]
