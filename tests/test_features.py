"""`qdeep features`: descriptors of real JPEGs through Ray Data into a verified feature store."""

import numpy as np
import torch

from qdeep.cli import main
from qdeep.cluster.features import load_backbone
from qdeep.cluster.store import FeatureStore
from qdeep.data.images import load_rgb
from qdeep.data.transforms import to_tensor
from qdeep.models import embed


def test_features_store_holds_every_image_with_the_backbones_descriptor(planet_dir, ray_cluster, tmp_path):
    out = tmp_path / "store"
    images = planet_dir / "test-jpg"
    assert main(["features", "--images", str(images), "--arch", "efficientnet_lite0", "--weights", "bundled",
                 "--image-size", "32", "--batch-size", "16", "--out", str(out)]) == 0
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
