"""`qdeep features`: descriptors of real JPEGs through Ray Data into a verified feature store."""

import csv
import json
import logging

import numpy as np
import pytest
import torch

from qdeep.cli import main
from qdeep.clustering.store import FeatureStore
from qdeep.data.images import load_rgb
from qdeep.data.transforms import to_tensor
from qdeep.distributed.features import load_backbone
from qdeep.models import embed

pytestmark = pytest.mark.ray  # Ray Data runs on a real local Ray


@pytest.fixture
def ray_data_warnings():
    """What Ray Data logs while planning a dataset (its deprecation notices among them)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ray.data._internal.util")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _deprecations(records) -> list[str]:
    return [r.getMessage() for r in records if "deprecated" in r.getMessage()]


def test_features_store_holds_every_image_with_the_backbones_descriptor(planet_dir, ray_cluster, tmp_path,
                                                                         ray_data_warnings):
    out = tmp_path / "store"
    images = planet_dir / "test-jpg"
    assert main(["features", "--images", str(images), "--arch", "efficientnet_lite0", "--weights", "bundled",
                 "--image-size", "32", "--batch-size", "16", "--out", str(out)]) == 0
    assert _deprecations(ray_data_warnings) == []  # the actor pool is a compute=ActorPoolStrategy
    store = FeatureStore(out)
    store.verify()
    assert store.total_rows == 40 and store.dim == 1280
    assert store.model["arch"] == "efficientnet_lite0" and len(store.model["weights_sha256"]) == 64
    ids, feats = store.to_numpy()
    assert sorted(ids) == sorted(p.name for p in images.glob("*.jpg"))
    assert np.isfinite(feats).all() and feats.std() > 0
    # Each row is the same backbone's penultimate features of that image, computed directly here.
    model = load_backbone("efficientnet_lite0", "bundled")
    spec = model.qdeep_arch
    for name in ids[:3]:
        x = to_tensor(load_rgb(images / name), 32, spec.mean, spec.std)[None]
        with torch.no_grad():
            expected = embed(model, x)[0].numpy()
        np.testing.assert_allclose(feats[list(ids).index(name)], expected, rtol=1e-4, atol=1e-4)


def test_features_store_in_a_bucket(planet_dir, ray_cluster, s3_bucket):
    """`--out s3://...`: the Ray Data tasks write the shards into the bucket, the manifest goes last."""
    out = f"{s3_bucket}/features"
    assert main(["features", "--images", str(planet_dir / "test-jpg"), "--arch", "efficientnet_lite0",
                 "--weights", "bundled", "--image-size", "32", "--batch-size", "16", "--rows-per-shard", "16",
                 "--out", out]) == 0
    store = FeatureStore(out)
    store.verify()
    ids, feats = store.to_numpy()
    assert store.total_rows == 40 and len(store.shards) >= 3 and sorted(ids) == sorted(set(ids))
    assert feats.shape == (40, 1280) and np.isfinite(feats).all()


def test_features_of_a_pack_in_a_bucket_equal_those_of_its_folder(planet_dir, ray_cluster, tmp_path, s3_bucket):
    """`--images s3://.../pack`: Ray Data reads the pack's shards from the bucket; every image gets the
    descriptor it gets from its own file, under its name in the pack."""
    pack, common = f"{s3_bucket}/pack", ["--arch", "efficientnet_lite0", "--weights", "bundled", "--image-size", "32",
                                         "--batch-size", "16"]
    assert main(["pack", "--data", str(planet_dir), "--out", pack]) == 0
    assert main(["features", "--images", pack, *common, "--out", f"{s3_bucket}/store"]) == 0
    assert main(["features", "--images", str(planet_dir / "test-jpg"), *common, "--out", str(tmp_path / "s")]) == 0
    ids, feats = FeatureStore(f"{s3_bucket}/store").to_numpy()
    assert len(ids) == 240 + 40 and {f"test_{i}" for i in range(40)} <= set(ids)
    folder_ids, folder_feats = FeatureStore(tmp_path / "s").to_numpy()
    by_name = dict(zip(ids, feats))
    for name, expected in zip(folder_ids, folder_feats):  # test-jpg/test_7.jpg is test_7 in the pack
        np.testing.assert_allclose(by_name[name.removesuffix(".jpg")], expected, rtol=1e-5, atol=1e-5)


def test_predict_runs_its_actor_pool_without_deprecated_arguments(planet_dir, ray_cluster, tmp_path,
                                                                  ray_data_warnings):
    """`qdeep predict` on an exported model (an untrained resnet18, exported as `qdeep train` does)."""
    from qdeep.distributed.predict import CNN_KIND

    from qdeep.models import build_model
    from qdeep.parts.targets import TARGETS

    labels = ["clear", "cloudy", "haze"]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(build_model("resnet18", len(labels), "none", "none").state_dict(), model_dir / "model.pt")
    TARGETS.get("multilabel")(labels).save(model_dir / "labels.json")
    (model_dir / "config.json").write_text(json.dumps({"kind": CNN_KIND, "task": "multilabel", "arch": "resnet18",
                                                       "image_size": 32, "num_labels": len(labels)}))
    submission = tmp_path / "sub.csv"
    assert main(["predict", "--model", str(model_dir), "--images", str(planet_dir / "test-jpg"),
                 "--out", str(submission)]) == 0
    assert _deprecations(ray_data_warnings) == []
    rows = list(csv.reader(open(submission)))
    assert len(rows) == 1 + 40 and all(set(r[1].split()) <= set(labels) for r in rows[1:])
