"""The feature store: round trips (driver and Ray Data, local and in an S3 bucket), damage reported
by shard name, and writes that fail leaving nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from qdeep.clustering.store import FeatureStore, StoreWriter
from qdeep.distributed.features import store_dataset, write_store_from_dataset
from qdeep.errors import QdeepError

MODEL = {"arch": "resnet18", "weights": "imagenet", "weights_sha256": "ab" * 32}
DIM = 8


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [f"train-jpg/train_{i:05d}.jpg" for i in range(n)]
    return images, rng.standard_normal((n, DIM), dtype=np.float32)


def _write(path, images, feats, rows_per_shard=40, batch=33, labels=None):
    with StoreWriter(path, DIM, MODEL, rows_per_shard=rows_per_shard, extra={"epoch": 3}) as writer:
        for s in range(0, len(images), batch):
            cols = {name: values[s : s + batch] for name, values in labels.items()} if labels else None
            chunk = feats[s : s + batch].copy()
            writer.write(images[s : s + batch], chunk, cols)
            chunk[:] = np.nan  # the writer must have kept its own copy
    return FeatureStore(path)


def test_round_trip_through_the_writer(tmp_path):
    images, feats = _data(150)
    tags = [f"tag{i % 4}" for i in range(150)]
    store = _write(tmp_path / "store", images, feats, labels={"tag": tags, "fold": [i % 5 for i in range(150)]})

    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["dtype"] == "float32" and manifest["dim"] == DIM
    assert manifest["model"] == MODEL and manifest["extra"] == {"epoch": 3}
    assert manifest["total_rows"] == 150 and manifest["columns"] == {"tag": "string", "fold": "int64"}
    assert [s["file"] for s in manifest["shards"]] == [f"part-0000{i}.arrow" for i in range(4)]
    assert [s["rows"] for s in manifest["shards"]] == [40, 40, 40, 30]
    assert all(len(s["xxh3_64"]) == 16 for s in manifest["shards"]) and "created" in manifest
    assert store.dim == DIM and store.total_rows == 150 and store.model == MODEL and len(store.shards) == 4
    shard = pa.ipc.open_file(tmp_path / "store" / "part-00000.arrow")
    assert str(shard.schema.field("features").type).startswith("fixed_size_list<element: float not null>[8]")
    frame = shard.read_pandas()  # pandas sees floats
    assert frame["features"][0].dtype == np.float32 and np.array_equal(np.stack(frame["features"]), feats[:40])

    store.verify()
    got_images, got = [], []
    for shard_images, shard_feats in store.iter_shards():
        assert shard_feats.dtype == np.float32 and shard_feats.shape == (len(shard_images), DIM)
        got_images += shard_images
        got.append(shard_feats)
    assert got_images == images and np.array_equal(np.concatenate(got), feats)
    all_images, all_feats = store.to_numpy()
    assert all_images == images and np.array_equal(all_feats, feats)
    assert store.read_column("tag") == tags and np.array_equal(store.read_column("features"), feats)
    (_, _, labels), *_ = store.iter_shards(columns=["fold"])  # the rows of the first write()
    assert labels["fold"] == [i % 5 for i in range(33)]

    sample_images, sample = store.sample(60, seed=7)
    assert len(set(sample_images)) == 60 and sample.shape == (60, DIM)
    assert np.array_equal(sample, feats[[images.index(i) for i in sample_images]])
    again_images, again = store.sample(60, seed=7)
    assert again_images == sample_images and np.array_equal(again, sample)
    assert store.sample(60, seed=8)[0] != sample_images
    assert sorted(store.sample(10_000, seed=0)[0]) == images  # capped at the whole store

    # One write() of several shards: encoded from the caller's array, which is free again after.
    mine = feats.copy()
    with StoreWriter(tmp_path / "one", DIM, MODEL, rows_per_shard=40) as writer:
        writer.write(images, mine, {"fold": np.arange(150) % 5})
        mine[:] = 0
    one = FeatureStore(tmp_path / "one")
    assert [s.rows for s in one.shards] == [40, 40, 40, 30] and np.array_equal(one.to_numpy()[1], feats)
    assert one.read_column("fold") == [i % 5 for i in range(150)]


def test_round_trip_through_ray_data(ray_cluster, tmp_path):
    import ray

    images, feats = _data(90, seed=1)
    rows = [{"image": im, "features": f, "tile": i % 3} for i, (im, f) in enumerate(zip(images, feats))]
    ds = ray.data.from_items(rows).repartition(3)
    store = write_store_from_dataset(ds, tmp_path / "store", DIM, MODEL, rows_per_shard=25)
    assert store.total_rows == 90 and sum(s.rows for s in store.shards) == 90
    assert all(s.rows <= 25 for s in store.shards)
    assert all(s.file.startswith("part-") and s.file.endswith(".arrow") for s in store.shards)
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == sorted(["manifest.json"] + [s.file for s in store.shards])
    store.verify()

    got_images, got = store.to_numpy()
    order = np.argsort(got_images)
    assert [got_images[i] for i in order] == images and np.array_equal(got[order], feats)
    assert sorted(store.read_column("tile")) == sorted(i % 3 for i in range(90))

    batch = store_dataset(store).take_batch(1000, batch_format="numpy")
    assert batch["features"].shape == (90, DIM) and batch["features"].dtype == np.float32
    order = np.argsort(batch["image"])
    assert list(batch["image"][order]) == images and np.array_equal(batch["features"][order], feats)

    bad = ray.data.from_items([{"image": "a.jpg", "features": np.zeros(DIM + 1, np.float32)}])
    with pytest.raises(QdeepError, match=r"shape \(1, 8\)") as err:
        write_store_from_dataset(bad, tmp_path / "bad", DIM, MODEL)
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_truncated_shard_is_reported_by_name(tmp_path):
    images, feats = _data(100)
    store = _write(tmp_path / "store", images, feats)
    shard = tmp_path / "store" / "part-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(QdeepError, match="part-00001.arrow is not a readable Arrow IPC file .*: truncated"):
        store.verify()
    with pytest.raises(QdeepError, match="part-00001.arrow"):
        for _ in FeatureStore(tmp_path / "store").iter_shards():
            pass
    with pytest.raises(QdeepError, match="part-00001.arrow"):
        store.to_numpy()
    shard.unlink()
    with pytest.raises(QdeepError, match="part-00001.arrow is missing") as err:
        store.sample(100)
    assert "\n" not in str(err.value)


def test_a_shard_with_other_rows_or_bytes_is_reported_by_name(tmp_path):
    images, feats = _data(100)
    store = _write(tmp_path / "store", images, feats)
    shard = tmp_path / "store" / "part-00002.arrow"
    table = pa.ipc.open_file(shard).read_all().slice(0, 5)
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(QdeepError, match=r"part-00002.arrow has 5 rows, the manifest says 20"):
        store.verify()
    with pytest.raises(QdeepError, match="part-00002.arrow"):
        store.sample(100, seed=0)

    # Same size and row count, one float flipped: only the checksum can tell.
    shard = tmp_path / "store" / "part-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(QdeepError, match=r"part-00000.arrow does not match its checksum \(xxh3_64\)"):
        next(store.iter_shards())


def test_an_interrupted_write_leaves_nothing_and_keeps_the_old_store(tmp_path):
    images, feats = _data(100)
    _write(tmp_path / "store", images, feats)
    before = (tmp_path / "store" / "manifest.json").read_text()

    for target in ("store", "fresh"):
        with pytest.raises(RuntimeError, match="killed"):
            with StoreWriter(tmp_path / target, DIM, MODEL, rows_per_shard=10) as writer:
                writer.write(images[:35], feats[:35])  # three shards flushed
                raise RuntimeError("killed")
    with pytest.raises(QdeepError, match="shape"):  # a failing write() behaves the same
        with StoreWriter(tmp_path / "store", DIM, MODEL, rows_per_shard=10) as writer:
            writer.write(images[:35], feats[:35])
            writer.write(images[:2], feats[:3])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temp dirs, no "fresh"
    assert (tmp_path / "store" / "manifest.json").read_text() == before
    store = FeatureStore(tmp_path / "store")
    store.verify()
    assert store.to_numpy()[0] == images

    # A complete write replaces the old store whole.
    _write(tmp_path / "store", images[:30], feats[:30])
    assert FeatureStore(tmp_path / "store").total_rows == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_missing_manifest_and_other_refusals(tmp_path):
    images, feats = _data(50)
    _write(tmp_path / "store", images, feats)
    (tmp_path / "store" / "manifest.json").unlink()
    with pytest.raises(QdeepError, match=r"is not a complete feature store \(no manifest.json\)"):
        FeatureStore(tmp_path / "store")
    with pytest.raises(QdeepError, match="does not exist"):
        FeatureStore(tmp_path / "nowhere")

    # A store a crash left without its manifest is replaced; a directory of other files never is.
    assert _write(tmp_path / "store", images, feats).total_rows == 50
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(QdeepError, match="not a feature store; refusing"):
        with StoreWriter(tmp_path / "photos", DIM, MODEL):
            pass
    assert (tmp_path / "photos" / "a.jpg").exists()

    # A store of the Parquet format (1) is named as such, with what to do.
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(QdeepError, match=r"format_version 1; this qdeep reads 2 .*rerun `qdeep features`") as err:
        FeatureStore(tmp_path / "store")
    assert "\n" not in str(err.value)

    with pytest.raises(QdeepError, match="weights_sha256"):
        StoreWriter(tmp_path / "x", DIM, {"arch": "resnet18", "weights": "imagenet"})
    bad = feats[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(QdeepError, match="train_00001.jpg contain NaN"):
        with StoreWriter(tmp_path / "x", DIM, MODEL) as writer:
            writer.write(images[:2], bad)
    assert not (tmp_path / "x").exists()


def test_a_store_in_a_bucket(s3_bucket):
    """Written and read through pyarrow's S3 filesystem (the tests' S3 server): no rename there,
    so a replaced store loses its manifest first and a failed write leaves nothing."""
    uri = f"{s3_bucket}/stores/one"
    fs, root = pafs.FileSystem.from_uri(uri)

    def names() -> list[str]:
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))

    images, feats = _data(100)
    store = _write(uri, images, feats, labels={"tag": [f"t{i % 3}" for i in range(100)]})
    assert names() == ["manifest.json", "part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    store = FeatureStore(uri)
    store.verify()
    assert store.to_numpy()[0] == images and np.array_equal(store.to_numpy()[1], feats)
    assert store.read_column("tag") == [f"t{i % 3}" for i in range(100)]
    sample_images, sample = store.sample(30, seed=1)
    assert np.array_equal(sample, feats[[images.index(i) for i in sample_images]])

    with pytest.raises(RuntimeError, match="killed"):
        with StoreWriter(uri, DIM, MODEL, rows_per_shard=10) as writer:
            writer.write(images[:35], feats[:35])
            assert "manifest.json" not in names()  # gone before the first new shard
            raise RuntimeError("killed")
    assert names() == []
    with pytest.raises(QdeepError, match="no manifest.json|does not exist"):
        FeatureStore(uri)

    _write(uri, images, feats)
    with fs.open_input_stream(f"{root}/part-00001.arrow") as f:
        data = f.read()
    with fs.open_output_stream(f"{root}/part-00001.arrow") as f:
        f.write(data[:-100])
    with pytest.raises(QdeepError, match=r"shard part-00001.arrow is not a readable Arrow IPC file") as err:
        FeatureStore(uri).verify()
    assert "\n" not in str(err.value) and uri in str(err.value)
    with fs.open_output_stream(f"{root}/part-00001.arrow") as f:
        f.write(data)
    fs.delete_file(f"{root}/part-00002.arrow")
    with pytest.raises(QdeepError, match=r"shard part-00002.arrow is missing") as err:
        list(FeatureStore(uri).iter_shards())[-1]
    assert "\n" not in str(err.value)

    with fs.open_output_stream(f"{root.rsplit('/', 1)[0]}/photos/a.jpg") as f:
        f.write(b"jpeg")
    with pytest.raises(QdeepError, match="not a feature store; refusing"):
        with StoreWriter(f"{s3_bucket}/stores/photos", DIM, MODEL):
            pass


def test_ray_data_writes_a_store_into_a_bucket(ray_cluster, s3_bucket):
    import ray

    images, feats = _data(60, seed=2)
    rows = [{"image": im, "features": f} for im, f in zip(images, feats)]
    store = write_store_from_dataset(ray.data.from_items(rows).repartition(2), f"{s3_bucket}/store", DIM, MODEL,
                                     rows_per_shard=25)
    store = FeatureStore(f"{s3_bucket}/store")
    got_images, got = store.to_numpy()
    order = np.argsort(got_images)
    assert [got_images[i] for i in order] == images and np.array_equal(got[order], feats)
    batch = store_dataset(store).take_batch(100, batch_format="numpy")
    order = np.argsort(batch["image"])
    assert batch["features"].dtype == np.float32 and np.array_equal(batch["features"][order], feats)
