"""The DeepCluster step as plain functions: pseudo-labels, class weights, the uniform sampler."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from qdeep.clustering.deepcluster import balanced_class_weights, pseudo_labels, uniform_cluster_sample
from qdeep.clustering.kmeans import nmi


def test_pseudo_labels_recover_separated_groups():
    x, truth = make_blobs(n_samples=600, centers=5, n_features=64, cluster_std=1.0, random_state=0)
    # Whitening gives every kept direction unit variance: keep the k-1 directions the groups span.
    result = pseudo_labels(x.astype(np.float32), k=5, pca_dim=4, seed=0)
    assert result.labels.shape == (600,) and nmi(result.labels, truth) > 0.95
    assert result.sizes.sum() == 600 and result.n_empty == 0 and result.score < 0
    again = pseudo_labels(x.astype(np.float32), k=5, pca_dim=4, seed=0)
    assert (again.labels == result.labels).all()  # seeded, deterministic


def test_balanced_weights_favour_small_clusters_and_zero_empty_ones():
    labels = np.array([0] * 90 + [1] * 10)
    w = balanced_class_weights(labels, k=3)
    assert w[2] == 0 and w[1] > w[0] > 0
    assert np.isclose((w[labels]).sum(), len(labels))  # balanced: mean weight per image is 1


def test_uniform_sampler_draws_clusters_equally():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    idx = uniform_cluster_sample(labels, seed=0)
    assert len(idx) == 1000
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.min() >= 300 and counts.max() <= 340
    assert len(set(idx[labels[idx] == 0])) == counts[0]  # the big cluster is drawn without replacement


def test_cluster_store_streams_shards_and_matches_the_in_memory_step(tmp_path, monkeypatch):
    from qdeep.clustering import deepcluster
    from qdeep.clustering.deepcluster import cluster_store
    from qdeep.clustering.store import FeatureStore, StoreWriter

    x, truth = make_blobs(n_samples=900, centers=5, n_features=32, cluster_std=1.0, random_state=1)
    x = x.astype(np.float32)
    ids = [f"img_{i}.jpg" for i in range(len(x))]
    with StoreWriter(tmp_path / "store", 32, {"arch": "test", "weights": "none", "weights_sha256": "0" * 64},
                     rows_per_shard=200) as writer:
        writer.write(ids, x)
    store = FeatureStore(tmp_path / "store")
    assert len(store.shards) == 5
    monkeypatch.setattr(deepcluster, "ASSIGN_BLOCK", 64)  # shards of 200 rows assigned in 4 blocks
    images, streamed = cluster_store(store, k=5, pca_dim=4, seed=0, sample_size=300)  # trained on a third
    order = np.array([int(i[4:-4]) for i in images])
    assert sorted(order) == list(range(900))
    assert nmi(streamed.labels, truth[order]) > 0.95
    assert streamed.sizes.sum() == 900 and streamed.score < 0 and streamed.distances.shape == (900,)
    in_memory = pseudo_labels(x, k=5, pca_dim=4, seed=0)
    assert nmi(streamed.labels, in_memory.labels[order]) > 0.95
    # whitened rows are unit vectors: a squared distance to the centre lies in [0, 4]
    assert (streamed.distances >= 0).all() and (streamed.distances <= 4).all()
    assert streamed.score == pytest.approx(-streamed.distances.mean())
