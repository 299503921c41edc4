"""`qdeep pack`: a data set as Parquet shards of image bytes with a manifest written last, on a local
path and in a bucket of the tests' real S3-protocol server (tests/s3server.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.fs
import pytest
from PIL import Image

from qdeep.cli import main
from qdeep.data.pack import MANIFEST, Pack, make_room, plan_shards, shard_bytes_for
from qdeep.data.synth import write_synthetic_classes, write_synthetic_planet
from qdeep.errors import QdeepError
from qdeep.io import filesystem
from qdeep.workflows.pack import run_pack


@pytest.fixture(scope="module")
def planet(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack-planet")
    write_synthetic_planet(root, n=40, size=32, seed=3, n_test=10)
    return root


def _bytes_by_name(root, folder):
    return {p.stem: p.read_bytes() for p in (root / folder).glob("*.jpg")}


def test_a_planet_layout_packs_into_shards_of_unchanged_bytes(ray_cluster, planet, tmp_path, capsys):
    out = tmp_path / "pack"
    assert main(["pack", "--data", str(planet), "--out", str(out), "--shard-mb", "0"]) == 2  # positive sizes only
    capsys.readouterr()
    third = sum(p.stat().st_size for p in planet.glob("*-jpg/*.jpg")) / 3 / 2**20
    manifest = run_pack(str(out), data=planet, shard_mb=third)
    assert manifest["counts"] == {"train": 40, "test": 10, "skipped": 0} and manifest["layout"] == "planet"
    assert len(manifest["shards"]) in (3, 4) and sum(s["rows"] for s in manifest["shards"]) == 50
    pack = Pack(str(out))
    table = pack.read(["image", "split", "tags", "origin", "data"])
    assert table.num_rows == 50 and table.column("split").to_pylist() == ["train"] * 40 + ["test"] * 10
    rows = table.to_pylist()
    train, test = _bytes_by_name(planet, "train-jpg"), _bytes_by_name(planet, "test-jpg")
    for row in rows:
        assert row["data"] == (train if row["split"] == "train" else test)[row["image"]]  # never re-encoded
    csv = {line.split(",")[0]: sorted(line.split(",")[1].split()) for line in
           (planet / "train_v2.csv").read_text().splitlines()[1:]}
    assert {r["image"]: r["tags"] for r in rows if r["split"] == "train"} == csv
    assert all(r["tags"] is None for r in rows if r["split"] == "test")
    assert manifest["labels"] == sorted({t for tags in csv.values() for t in tags})
    assert pack.rows("test", ["image"]).to_pylist() == [{"image": r["image"]} for r in rows if r["split"] == "test"]
    assert pack.rows("train", ["tags", "image"]).column_names == ["tags", "image"]
    some = [rows[0]["image"], rows[-1]["image"], rows[0]["image"]]  # from two shards, one named twice
    assert pack.images(some) == {r["image"]: r["data"] for r in (rows[0], rows[-1])}
    with pytest.raises(QdeepError, match=rf"^pack {pack.uri}: no image named nowhere \(1 missing\)$"):
        pack.images(["nowhere", rows[1]["image"]])
    pack.verify()


def test_shards_are_small_enough_for_every_cpu_but_not_tiny():
    mb = 1 << 20
    assert shard_bytes_for(1000 * mb, 16, 256 * mb) == 1000 * mb // 16  # 16 shards, not 4
    assert shard_bytes_for(100 * mb, 16, 256 * mb) == 16 * mb  # the floor
    assert shard_bytes_for(10_000 * mb, 16, 256 * mb) == 256 * mb  # --shard-mb is the most
    assert shard_bytes_for(100 * mb, 16, 1 * mb) == 1 * mb  # a --shard-mb below the floor stays


def test_shards_take_consecutive_images_up_to_their_size():
    assert plan_shards([5, 5, 5, 5, 5], 10) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_shards([50, 1, 1], 10) == [range(0, 1), range(1, 3)]  # a big file still gets a shard
    assert plan_shards([], 10) == []


def test_a_folder_per_class_packs_its_class_as_the_label(ray_cluster, tmp_path):
    write_synthetic_classes(tmp_path / "scenes", n_per_class=3, size=16, seed=0)
    manifest = run_pack(str(tmp_path / "pack"), images=tmp_path / "scenes")
    assert manifest["layout"] == "class-folders" and manifest["counts"]["train"] == 3 * len(manifest["labels"])
    rows = Pack(str(tmp_path / "pack")).read().to_pylist()
    assert all(r["tags"] == [r["image"].split("/")[0]] for r in rows)


def _corrupt(path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])


def test_a_bad_image_stops_the_pack_and_leaves_nothing(ray_cluster, planet, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(planet, data)
    _corrupt(data / "train-jpg" / "train_7.jpg")
    out = tmp_path / "pack"
    assert main(["pack", "--data", str(data), "--out", str(out)]) == 2  # bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qdeep: error: ") and "train_7.jpg: cannot decode image" in err[-1]
    assert "train_v2.csv:9" in err[-1] and "--on-bad-image skip" in err[-1]
    assert list(out.iterdir()) == []  # no shard, no manifest

    assert main(["pack", "--data", str(data), "--out", str(out), "--on-bad-image", "skip"]) == 0
    assert "39 training and 10 test images" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["counts"]["skipped"] == 1 and manifest["skipped"][0]["file"].endswith("train_7.jpg")
    assert "train_7" not in Pack(str(out)).read(["image"]).column("image").to_pylist()


def test_a_pack_replaces_a_pack_but_not_other_files(tmp_path):
    out = tmp_path / "pack"
    out.mkdir()
    (out / "part-00003.parquet").write_bytes(b"an interrupted pack's shard")
    make_room(str(out))
    assert list(out.iterdir()) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QdeepError, match=r"^--out .*pack: holds notes.txt, which is not part of a pack; refusing"):
        make_room(str(out))
    assert (out / "notes.txt").exists()


def test_an_interrupted_pack_is_not_a_pack(tmp_path):
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(QdeepError, match=r"pack is not a complete pack \(no pack.json; `qdeep pack` writes it last\)$"):
        Pack(str(tmp_path / "pack"))


def test_a_pack_in_a_bucket_and_its_damaged_shards(ray_cluster, planet, s3_bucket, capsys):
    uri = f"{s3_bucket}/planet"
    assert main(["pack", "--data", str(planet), "--out", uri, "--shard-mb", "1"]) == 0
    assert f"into {uri}" in capsys.readouterr().out
    pack = Pack(uri)
    assert pack.read(["image"]).num_rows == 50 and pack.files()[0].startswith(s3_bucket.removeprefix("s3://"))
    pack.verify()
    fs, inner = filesystem(uri)
    shard = f"{inner}/part-00000.parquet"
    with fs.open_input_file(shard) as f:
        data = f.read()
    with fs.open_output_stream(shard) as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(QdeepError, match=rf"^pack {uri}: shard part-00000.parquet has {len(data) // 2} bytes, "
                                         rf"the manifest says {len(data)}: truncated or rewritten$"):
        Pack(uri)
    fs.delete_file(shard)
    with pytest.raises(QdeepError, match=rf"^pack {uri}: shard part-00000.parquet is missing$"):
        Pack(uri)
    assert main(["pack", "--data", str(planet), "--out", uri]) == 0  # replaces the damaged pack
    assert len(Pack(uri).files()) == 1
    assert fs.get_file_info(pyarrow.fs.FileSelector(inner)).__len__() == 2  # one shard and the manifest


@pytest.mark.unit
def test_a_shard_of_geotiffs_keeps_their_bytes_and_checks_their_bands(planet4, tmp_path):
    from qdeep.data.pack import Row, write_shard
    from qdeep.data.rasters import BandLayout, write_geotiff

    tifs = sorted((planet4 / "train-tif-v2").glob("*.tif"))[:3]
    three = tmp_path / "three.tif"
    write_geotiff(three, np.ones((3, 8, 8), dtype=np.uint16))
    rows = [Row(p.stem, str(p), "train", ["clear"], None) for p in [*tifs, three]]
    out = tmp_path / "pack"
    out.mkdir()
    listing, failures = write_shard(str(out), 0, rows, BandLayout(4, "uint16", str(tifs[0]), "training set"))
    assert listing["rows"] == 3 and len(failures) == 1 and failures[0][0] == 3
    assert failures[0][1].startswith("has 3 band(s) of uint16; the training set's first image")
    import pyarrow.parquet as pq

    data = pq.read_table(out / listing["file"]).column("data").to_pylist()
    assert data == [p.read_bytes() for p in tifs]  # 16-bit, 4 bands: unchanged
