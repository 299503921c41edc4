"""The k-means stage on CPU: recovery of blobs, whitening, empty clusters, determinism, scores."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from qdeep.clustering.kmeans import (
    KMeans,
    _two_means,
    choose_pca_dim,
    cluster_sizes,
    clustering_score,
    fit_pca_whitening,
    ground_truth_scores,
    imbalance_factor,
    n_empty_clusters,
    nmi,
    preprocess,
    preprocess_features,
)


def flat_search(x, centroids):
    """The labels a plain faiss flat search gives: what KMeans' labels must equal."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(x, 1)[1][:, 0]


def blobs(n=2000, k=10, d=32, sep=8.0, seed=0):
    """k well-separated Gaussian blobs: centres ~N(0, sep^2), unit noise; returns (x, blob ids)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, sep, size=(k, d))
    truth = rng.integers(k, size=n)
    x = centres[truth] + rng.normal(size=(n, d))
    return x.astype(np.float32), truth


@pytest.mark.parametrize("init", ["kmeans++", "afkmc2", "random"])
def test_kmeans_recovers_separated_blobs(init):
    x, truth = blobs()
    km = KMeans(10, seed=0, init=init).fit(x)
    assert km.centroids_.shape == (10, 32) and km.centroids_.dtype == np.float32
    assert km.labels_.shape == (2000,)
    assert nmi(km.labels_, truth) > 0.95
    assert km.obj_.ndim == 1 and len(km.obj_) >= 1 and np.all(np.diff(km.obj_) <= 1e-3 * km.obj_[0])
    assert km.inertia_ == pytest.approx(-clustering_score(x, km.labels_, km.centroids_) * len(x), rel=1e-4)
    assert km.n_empty_ == 0 and 1.0 <= km.imbalance_factor_ < 1.2
    assert km.gpu_ is False  # faiss-cpu here


def test_refine_repairs_a_bad_seeding():
    """Random init on many separated blobs leaves some blobs without a centroid; split/merge fixes it."""
    x, truth = blobs(n=6000, k=60, d=16, sep=10.0, seed=3)
    plain = KMeans(60, init="random", refine=0, seed=1).fit(x)
    fixed = KMeans(60, init="random", seed=1).fit(x)
    assert fixed.n_swaps_ > 0
    assert fixed.inertia_ < 0.5 * plain.inertia_
    assert nmi(fixed.labels_, truth) > 0.99


def test_subsampled_fit_labels_every_row():
    x, truth = blobs(n=3000)
    km = KMeans(10, sample_size=300, max_points_per_centroid=100, seed=2).fit(x)
    assert km.n_train_ == 300
    assert km.labels_.shape == (3000,)
    assert nmi(km.labels_, truth) > 0.95
    assert KMeans(10, seed=2).fit(x).n_train_ == 10 * 16  # the default cap: 16 rows per centroid


@pytest.mark.parametrize("sep, polish", [(8.0, "auto"), (8.0, 1), (0.3, "auto"), (0.3, 2)])
def test_polish_labels_are_exact_nearest_centroids(sep, polish):
    """The polish relabels only rows Hamerly's bound cannot settle; labels must still be exact."""
    x, _ = blobs(n=4000, k=20, d=16, sep=sep, seed=4)
    km = KMeans(20, max_points_per_centroid=20, polish=polish, seed=0).fit(x)
    assert km.n_train_ == 400
    np.testing.assert_array_equal(km.labels_, km.predict(x))
    if polish != "auto":
        assert km.n_polish_ == polish
    elif sep > 1:
        assert km.n_polish_ == 1  # separated blobs: the bound settles nearly every row
    plain = KMeans(20, max_points_per_centroid=20, polish=0, seed=0).fit(x)
    assert km.inertia_ <= plain.inertia_ * (1 + 1e-6)


@pytest.mark.parametrize("sep", [8.0, 1.0, 0.3])
def test_labels_and_predict_equal_a_flat_search(sep):
    """Bounds, projected candidates and the polish skip searches, never change an answer."""
    x, _ = blobs(n=20000, k=40, d=64, sep=sep, seed=6)
    km = KMeans(40, seed=0).fit(x)
    truth = flat_search(x, km.centroids_)
    np.testing.assert_array_equal(km.labels_, truth)
    np.testing.assert_array_equal(km.predict(x), truth)
    np.testing.assert_array_equal(km.predict_stream(x[i : i + 3001] for i in range(0, len(x), 3001)), truth)
    direct = ((x.astype(np.float64) - km.centroids_[truth]) ** 2).sum()
    assert km.inertia_ == pytest.approx(direct, rel=1e-5)
    if sep > 4:  # separated: projected candidates confirmed by Elkan's bound, the polish nearly free
        assert km._predict_axes is not None and km.n_polish_ == 1
        assert km.n_searched_ < 0.2 * len(x)  # a plain labelling pass alone searches every row
    if sep < 0.5:  # no cluster structure: the polish cannot be afforded and is not tried
        assert km.n_polish_ == 0 and km._predict_axes is None


def test_bounds_skip_searches_on_separated_blobs():
    """Lloyd on the training rows only searches rows whose label the bounds cannot settle."""
    x, truth = blobs(n=8000, k=50, d=32, sep=10.0, seed=2)
    km = KMeans(50, seed=0, max_points_per_centroid=10_000).fit(x)  # training set = all rows
    assert km.n_train_ == len(x) and nmi(km.labels_, truth) > 0.99
    assert km.n_searched_ < 2 * len(x)  # plain Lloyd: one search of every row per iteration
    assert len(km.obj_) >= 3
    np.testing.assert_array_equal(km.labels_, flat_search(x, km.centroids_))


def test_two_means_splits_each_cluster_on_its_own():
    """The vectorised 2-means of several clusters gives what each cluster gives alone."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x[:1500, 0] += 6.0  # the first cluster's rows straddle two groups
    groups = [np.arange(0, 3000, 2), np.arange(1, 3000, 7), np.array([5, 9]), np.arange(3000)[::3][:2100]]
    together, sse = _two_means(x, groups, max_fit=1000)
    for g, halves, s in zip(groups, together, sse):
        alone, s_alone = _two_means(x, [g], max_fit=1000)
        np.testing.assert_allclose(halves, alone[0], rtol=1e-5, atol=1e-5)
        assert s == pytest.approx(s_alone[0], rel=1e-6)
        direct = np.minimum(*(((x[g].astype(np.float64) - h) ** 2).sum(1) for h in halves)).sum()
        assert s == pytest.approx(direct, rel=1e-5)
    assert abs(together[0][0, 0] - together[0][1, 0]) > 4.0  # split along the gap
    assert sse[0] < 0.7 * ((x[groups[0]] - x[groups[0]].mean(0)) ** 2).sum()  # 16 + 9 -> 16 per row


@pytest.mark.parametrize("sep, d", [(1.0, 32), (8.0, 64)])
def test_deterministic_for_a_seed(sep, d):
    x, _ = blobs(n=1500, k=20, d=d, sep=sep)  # sep 1: overlapping blobs, many equally good local minima
    a = KMeans(20, seed=5, max_points_per_centroid=40).fit(x)
    b = KMeans(20, seed=5, max_points_per_centroid=40).fit(x)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.obj_, b.obj_)
    assert a.n_searched_ == b.n_searched_


def test_predict_stream_equals_predict():
    x, _ = blobs(n=1000)
    km = KMeans(10, seed=0).fit(x[:600])
    whole = km.predict(x)
    chunks = (x[i : i + 137] for i in range(0, len(x), 137))
    np.testing.assert_array_equal(km.predict_stream(chunks), whole)
    np.testing.assert_array_equal(km.predict(x[:600]), km.labels_)
    assert km.predict_stream(iter([])).shape == (0,)
    labels, sq = km.predict_stream((x[i : i + 137] for i in range(0, len(x), 137)), return_distances=True)
    np.testing.assert_array_equal(labels, whole)
    direct = ((x.astype(np.float64) - km.centroids_[whole]) ** 2).sum(1)
    assert sq.dtype == np.float32 and np.allclose(sq, direct, rtol=1e-4, atol=1e-5)


def test_empty_clusters_are_counted():
    """5 distinct points, each repeated 20 times, into k=8: at most 5 clusters can hold rows."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(0, 10, size=(5, 4)), 20, axis=0).astype(np.float32)
    km = KMeans(8, seed=0, init="random").fit(x)
    sizes = cluster_sizes(km.labels_, 8)
    assert sizes.sum() == 100
    assert km.n_empty_ == n_empty_clusters(sizes) == int((sizes == 0).sum()) == 3
    assert km.n_split_ > 0  # faiss kept splitting clusters left empty
    assert km.inertia_ < 1e-5 * float((x.astype(np.float64) ** 2).sum())  # zero up to float32 round-off


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError):
        KMeans(3, init="kmeans||")
    with pytest.raises(ValueError):
        KMeans(50).fit(np.zeros((10, 4), np.float32))
    with pytest.raises(RuntimeError):
        KMeans(3).predict(np.zeros((10, 4), np.float32))


def test_whitening_dim_and_unit_norm():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))).astype(np.float32)
    out, pca = preprocess_features(x, dim=24)
    assert out.shape == (500, 24) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # the same transform on new rows
    again = preprocess(x[:10], pca)
    np.testing.assert_allclose(again, out[:10], rtol=1e-5, atol=1e-6)
    # whitening: before normalisation the components are uncorrelated with equal variance
    white = pca.apply(x).astype(np.float64)
    cov = np.cov(white, rowvar=False)
    np.testing.assert_allclose(np.diag(cov), cov[0, 0], rtol=0.05)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.05 * cov[0, 0]
    # dim chosen from the data: 500 // 50 = 10 -> floor of 16
    auto, _ = preprocess_features(x)
    assert auto.shape == (500, 16)
    assert fit_pca_whitening(x, 8, sample_size=200).d_out == 8
    with pytest.raises(ValueError):
        fit_pca_whitening(x[:10], 20)  # more dims than the 10 rows can span


def test_choose_pca_dim():
    assert choose_pca_dim(1_200_000, 4096) == 256  # the reference's value at ImageNet scale
    assert choose_pca_dim(3000, 4096) == 60
    assert choose_pca_dim(300, 1280) == 16
    assert choose_pca_dim(3000, 4096, requested=32) == 32
    assert choose_pca_dim(100_000, 40) == 40  # capped by the feature dim
    assert choose_pca_dim(100_000, 40, requested=128) == 40
    assert choose_pca_dim(10, 4096) == 9  # capped by the sample count (rank of centred data)
    assert choose_pca_dim(10, 4096, requested=256) == 9
    with pytest.raises(ValueError):
        choose_pca_dim(1, 10)


def test_clustering_score_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    centroids = rng.normal(size=(5, 8)).astype(np.float32)
    labels = rng.integers(5, size=300)
    direct = -np.mean(np.sum((x.astype(np.float64) - centroids[labels]) ** 2, axis=1))
    assert clustering_score(x, labels, centroids) == pytest.approx(direct, rel=1e-9)


def test_sizes_and_imbalance():
    sizes = cluster_sizes(np.array([0, 0, 1, 3, 3, 3]), 5)
    np.testing.assert_array_equal(sizes, [2, 1, 0, 3, 0])
    assert n_empty_clusters(sizes) == 2
    assert imbalance_factor(sizes) == pytest.approx(5 * (4 + 1 + 9) / 36)
    assert imbalance_factor(np.full(7, 10)) == pytest.approx(1.0)


def test_ground_truth_scores():
    truth = np.array(["clear", "haze", "cloudy", "clear", "haze", "cloudy"] * 20, dtype=object)
    perfect = np.array([{"clear": 7, "haze": 2, "cloudy": 5}[t] for t in truth])  # ids need not match names
    s = ground_truth_scores(perfect, truth)
    assert s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0) and s["purity"] == pytest.approx(1.0)
    random = np.random.default_rng(0).integers(3, size=len(truth))
    r = ground_truth_scores(random, truth)
    assert r["nmi"] < 0.2 and abs(r["ari"]) < 0.1 and r["purity"] < 0.6
    # purity by hand: clusters {a, a, b} and {b}: (2 + 1) / 4
    assert ground_truth_scores([0, 0, 0, 1], ["a", "a", "b", "b"])["purity"] == pytest.approx(0.75)
    # any hashable truth (e.g. a tuple of tags), and NMI symmetric
    tags = [("clear", "primary"), ("haze",), ("clear", "primary"), ("haze",)]
    assert ground_truth_scores([1, 0, 1, 0], tags)["purity"] == 1.0
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
