"""The k-means stage on CPU: recovery of blobs, whitening, empty clusters, determinism, scores."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from qdeep.clustering.kmeans import (
    KMeans,
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


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs()
    km = KMeans(10, seed=0).fit(x)
    assert km.centroids_.shape == (10, 32) and km.centroids_.dtype == np.float32
    assert km.labels_.shape == (2000,)
    assert nmi(km.labels_, truth) > 0.95
    assert km.obj_.ndim == 1 and len(km.obj_) >= 1 and np.all(np.diff(km.obj_) <= 1e-3 * km.obj_[0])
    assert km.inertia_ == pytest.approx(-clustering_score(x, km.labels_, km.centroids_) * len(x), rel=1e-4)
    assert km.n_empty_ == 0 and 1.0 <= km.imbalance_factor_ < 1.2
    assert km.gpu_ is False  # faiss-cpu here


def test_kmeans_trains_on_every_row():
    """No subsampling (faiss' default is 256 rows per centroid): at convergence every centroid is
    the mean of all the rows labelled with it."""
    x, _ = blobs(n=20_000, k=5, d=8, sep=10.0, seed=1)
    km = KMeans(5, seed=0, niter=50).fit(x)
    means = np.stack([x[km.labels_ == c].astype(np.float64).mean(0) for c in range(5)])
    np.testing.assert_allclose(km.centroids_, means, atol=1e-4)


@pytest.mark.parametrize("sep", [8.0, 1.0, 0.3])
def test_labels_and_predict_equal_a_flat_search(sep):
    x, _ = blobs(n=20000, k=40, d=64, sep=sep, seed=6)
    km = KMeans(40, seed=0).fit(x)
    truth = flat_search(x, km.centroids_)
    np.testing.assert_array_equal(km.labels_, truth)
    np.testing.assert_array_equal(km.predict(x), truth)
    np.testing.assert_array_equal(km.predict_stream(x[i : i + 3001] for i in range(0, len(x), 3001)), truth)
    direct = ((x.astype(np.float64) - km.centroids_[truth]) ** 2).sum()
    assert km.inertia_ == pytest.approx(direct, rel=1e-5)


def test_restarts_keep_the_lowest_objective():
    x, _ = blobs(n=3000, k=30, d=16, sep=3.0, seed=2)
    runs = [KMeans(30, seed=s).fit(x) for s in range(4)]
    best = KMeans(30, seed=0, nredo=4).fit(x)
    assert best.obj_[-1] == min(run.obj_[-1] for run in runs)
    assert best.inertia_ <= min(run.inertia_ for run in runs) * (1 + 1e-4)


def test_a_start_from_a_partitions_means_keeps_that_partition():
    """Overlapping blobs have several k-means partitions of about the same objective: random starts
    move between them with the seed, a start from the means of one partition stays on it (what
    DeepCluster's warm start relies on), on the CPU loop and the torch loop alike."""
    import torch

    from qdeep.clustering.kmeans import faiss_lloyd, torch_lloyd

    x, _ = blobs(n=3000, k=10, d=8, sep=1.0, seed=3)
    cold = [KMeans(10, seed=s).fit(x).labels_ for s in range(3)]
    assert min(nmi(cold[0], other) for other in cold[1:]) < 0.9  # the seeds find different partitions
    means = np.stack([x[cold[0] == c].mean(axis=0) for c in range(10)])
    for seed in range(3):
        warm = KMeans(10, nredo=0, seed=seed, init=means).fit(x)  # the start from `means` only
        assert nmi(warm.labels_, cold[0]) > 0.97 and warm.obj_[-1] <= warm.obj_[0] * (1 + 1e-6)
        # with random starts beside it, the lowest objective of all of them wins
        both, random_only = KMeans(10, nredo=2, seed=seed, init=means).fit(x), KMeans(10, nredo=2, seed=seed).fit(x)
        assert both.obj_[-1] == min(warm.obj_[-1], random_only.obj_[-1])
    cpu = flat_search(x, faiss_lloyd(x, 10, 20, seed=1, init=means)[0])
    on_torch = flat_search(x, torch_lloyd(torch.from_numpy(x), 10, 20, seed=1, init=means)[0])
    assert nmi(cpu, on_torch) > 0.99
    with pytest.raises(ValueError, match=r"init must be \(k, d\) = \(10, 8\)"):
        KMeans(10, init=means[:, :4]).fit(x)
    with pytest.raises(ValueError, match=r"nredo >= 0 with init"):
        KMeans(10, nredo=0).fit(x)


def test_the_torch_loop_is_faiss_contrib_kmeans_step_for_step():
    """torch_lloyd from random rows (init=None) is faiss' own torch k-means, which it replaced to
    take a start: the same seed gives the same centroids and objectives."""
    import torch
    from faiss.contrib.clustering import kmeans
    from faiss.contrib.torch.clustering import DatasetAssign

    from qdeep.clustering.kmeans import torch_lloyd

    x, _ = blobs(n=500, k=5, d=2, sep=0.0, seed=4)
    tensor = torch.from_numpy(np.round(x, 1))  # 100 clusters on rounded 2-d rows: some empty out and are split
    centroids, obj, nsplit = torch_lloyd(tensor, 100, 15, seed=7)
    theirs, stats = kmeans(100, DatasetAssign(tensor), niter=15, seed=7, verbose=False, return_stats=True)
    np.testing.assert_allclose(centroids, theirs.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(obj, [s["obj"] for s in stats], rtol=1e-5)
    assert nsplit == sum(s["nsplit"] for s in stats) > 0


@pytest.mark.parametrize("sep, d", [(1.0, 32), (8.0, 64)])
def test_deterministic_for_a_seed(sep, d):
    x, _ = blobs(n=1500, k=20, d=d, sep=sep)  # sep 1: overlapping blobs, many equally good local minima
    a = KMeans(20, seed=5).fit(x)
    b = KMeans(20, seed=5).fit(x)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.obj_, b.obj_)


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
    np.testing.assert_array_equal(km.fit_predict(x[:600]), km.labels_)


def test_empty_clusters_are_counted():
    """5 distinct points, each repeated 20 times, into k=8: at most 5 clusters can hold rows."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(0, 10, size=(5, 4)), 20, axis=0).astype(np.float32)
    km = KMeans(8, seed=0).fit(x)
    sizes = cluster_sizes(km.labels_, 8)
    assert sizes.sum() == 100
    assert km.n_empty_ == n_empty_clusters(sizes) == int((sizes == 0).sum()) == 3
    assert km.n_split_ > 0  # faiss kept splitting clusters left empty
    assert km.inertia_ < 1e-5 * float((x.astype(np.float64) ** 2).sum())  # zero up to float32 round-off


def test_kmeans_rejects_bad_input():
    x = np.zeros((10, 4), np.float32)
    for bad in (KMeans(0), KMeans(3, niter=0), KMeans(3, nredo=0), KMeans(3, use_gpu="yes"), KMeans(50)):
        with pytest.raises(ValueError):
            bad.fit(x)  # scikit-learn style: parameters are checked in fit
    with pytest.raises(ValueError):
        KMeans(3).fit(np.zeros(10, np.float32))
    with pytest.raises(RuntimeError):
        KMeans(3).predict(x)
    with pytest.raises(RuntimeError):
        KMeans(3, use_gpu=True).fit(x)  # faiss-cpu here: no GPU to run on


def test_kmeans_is_a_scikit_learn_estimator():
    from sklearn.base import clone

    km = KMeans(7, niter=5, nredo=2, seed=3, use_gpu=False)
    assert km.get_params() == {"k": 7, "niter": 5, "nredo": 2, "seed": 3, "init": None, "use_gpu": False,
                               "verbose": False}
    copy = clone(km).set_params(k=4)
    assert copy.k == 4 and km.k == 7 and not hasattr(copy, "centroids_")
    x, _ = blobs(n=500, k=4)
    assert copy.fit_predict(x).shape == (500,) and copy.centroids_.shape == (4, 32)


def test_the_gpu_branch_runs_faiss_torch_loop(monkeypatch, capsys):
    """fit's GPU branch (faiss' torch Lloyd loop, `torch_lloyd`), wired up on the CPU: a CPU tensor
    where the GPU would hold a CUDA one, a CPU index where it would copy one to the GPUs."""
    import torch

    from qdeep.clustering import kmeans

    x, truth = blobs(n=3000, k=10, d=32, sep=1.0, seed=4)
    cpu = KMeans(10, seed=0, nredo=3, use_gpu=False).fit(x)
    monkeypatch.setattr(kmeans, "gpu_available", lambda: True)
    monkeypatch.setattr(kmeans, "faiss_lloyd", None)  # the CPU loop must not run
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: index)
    km = KMeans(10, seed=0, nredo=3).fit(x)
    assert km.gpu_ is True and km.centroids_.dtype == np.float32 and km.centroids_.shape == (10, 32)
    assert len(km.obj_) == 20 and km.obj_[-1] <= km.obj_[0]  # faiss' torch loop runs every iteration
    np.testing.assert_array_equal(km.labels_, flat_search(x, km.centroids_))
    assert km.inertia_ == pytest.approx(cpu.inertia_, rel=0.02) and nmi(km.labels_, truth) > 0.9
    assert capsys.readouterr().out == ""  # faiss' "preproc..." is silenced


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
