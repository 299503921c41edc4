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


def test_cluster_store_also_starts_from_the_previous_partition(tmp_path):
    """`previous` (id -> label) is one more k-means start: on separated blobs every start finds the
    same groups and the previous one wins the tie, numbers included, whatever the order of the
    ids; on overlapping blobs the lowest objective of all starts wins, so it is never worse than
    the random starts alone."""
    from qdeep.clustering.deepcluster import cluster_store, partition_means
    from qdeep.clustering.store import FeatureStore, StoreWriter

    def store_of(x, name):
        ids = [f"img_{i}.jpg" for i in range(len(x))]
        with StoreWriter(tmp_path / name, x.shape[1], {"arch": "test", "weights": "none", "weights_sha256": "0" * 64},
                         rows_per_shard=200) as writer:
            writer.write(ids, x.astype(np.float32))
        return FeatureStore(tmp_path / name), ids

    x, truth = make_blobs(n_samples=900, centers=5, n_features=32, cluster_std=1.0, random_state=1)
    store, ids = store_of(x, "separated")
    renamed = (truth + 2) % 5  # other numbers for the same groups
    previous = {ids[i]: int(renamed[i]) for i in np.random.default_rng(0).permutation(len(ids))}
    for seed in range(3):
        images, clustering = cluster_store(store, k=5, pca_dim=4, seed=seed, previous=previous)
        np.testing.assert_array_equal(clustering.labels, [previous[i] for i in images])

    x, _ = make_blobs(n_samples=900, centers=8, n_features=8, cluster_std=3.0, random_state=2)
    store, ids = store_of(x, "overlapping")
    _, first = cluster_store(store, k=8, pca_dim=6, seed=0)
    previous = dict(zip(ids, first.labels.tolist()))
    for seed in range(1, 4):
        _, cold = cluster_store(store, k=8, pca_dim=6, seed=seed)
        _, warm = cluster_store(store, k=8, pca_dim=6, seed=seed, previous=previous)
        assert warm.score >= cold.score - 1e-6 and warm.score >= first.score - 1e-6

    # a label with no row in the sample starts from a random row of it
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    means = partition_means(rows, np.array([0, 0, 1, 1, 1, 1]), 3, seed=0)
    np.testing.assert_allclose(means[:2], [[1, 2], [7, 8]])
    assert any((means[2] == row).all() for row in rows)
