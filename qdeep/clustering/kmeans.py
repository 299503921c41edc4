"""The k-means stage of DeepCluster, as facebookresearch/deepcluster's `clustering.py`: PCA-whitening
(eigen_power -0.5) and row-wise L2 normalisation, faiss k-means on every row from random rows, and
the scores (the seed article's clustering score, sizes, imbalance, empty clusters, NMI/ARI/purity).

The PCA dimension is chosen from the data size (`choose_pca_dim`): the reference's fixed 256 hurt
NMI badly on a few thousand images. On real descriptors plain faiss k-means was within 1 % of the
best inertia measured, in no more time than any other method using every row (the hand-written
k-means it replaced, k-means++/AFK-MC2 seeding, MiniBatchKMeans: `scripts/bench_kmeans.py`). On a
GPU the Lloyd loop is faiss' torch one over a CUDA tensor, so it stays on the GPU. A run can also
start from given centroids (DeepCluster's previous partition: `KMeans(init=...)`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

try:
    import faiss
except ImportError as exc:  # pragma: no cover - depends on the installed extra
    raise ImportError("qdeep's k-means needs faiss: pip install 'qdeep[cpu]' (or 'qdeep[gpu]')") from exc

__all__ = ["KMeans", "choose_pca_dim", "cluster_sizes", "clustering_score", "faiss_lloyd", "fit_pca_whitening",
           "gpu_available", "ground_truth_scores", "imbalance_factor", "n_empty_clusters", "nmi", "preprocess",
           "preprocess_features", "sq_distances", "torch_lloyd"]

EVERY_ROW = 10_000_000  # faiss' max_points_per_centroid: no subsampling, as the reference (faiss' default: 256)


def choose_pca_dim(n_samples: int, dim: int, requested: int | None = None) -> int:
    """PCA output dimension: `requested`, else ``min(256, max(16, n_samples // 50))`` (the reference's
    256 from 12,800 samples up; 16-64 dims measured far better than 256 on a few thousand images),
    capped by the feature dim and by n_samples - 1 (the rank of centred data: whitening a direction
    of zero variance divides by zero)."""
    if n_samples < 2 or dim < 1:
        raise ValueError(f"PCA needs at least 2 samples and 1 feature, got n_samples={n_samples}, dim={dim}")
    if requested is None:
        requested = min(256, max(16, n_samples // 50))
    if requested < 1:
        raise ValueError(f"requested PCA dim must be >= 1, got {requested}")
    return int(min(requested, dim, n_samples - 1))


def _as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (n, d), got shape {x.shape}")
    return x


def fit_pca_whitening(x: np.ndarray, dim: int, sample_size: int | None = None, seed: int = 0) -> faiss.PCAMatrix:
    """faiss PCA-whitening (eigen_power -0.5) of `x` to `dim` dims, trained on `sample_size` seeded rows
    if given."""
    x = _as_f32(x)
    if sample_size is not None and len(x) > sample_size:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample_size, replace=False))]
    n, d = x.shape
    if not 1 <= dim <= min(d, n - 1):
        raise ValueError(f"PCA output dim must be in [1, min(dim, rows - 1) = {min(d, n - 1)}], got {dim}")
    pca = faiss.PCAMatrix(d, int(dim), -0.5)  # eigen_power is positional in faiss' Python API
    pca.train(x)
    return pca


def preprocess(x: np.ndarray, pca: faiss.PCAMatrix) -> np.ndarray:
    """Apply a trained PCA-whitening, then L2-normalise each row (float32; zero rows stay zero)."""
    out = np.ascontiguousarray(pca.apply(_as_f32(x)), dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError("PCA-whitening gave non-finite values: the PCA dim exceeds the data's rank (choose_pca_dim)")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=out, where=norms > 0)


def preprocess_features(x: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, faiss.PCAMatrix]:
    """The reference's `preprocess_features`: (whitened + L2 rows, pca), `dim=None` by `choose_pca_dim`."""
    x = _as_f32(x)
    pca = fit_pca_whitening(x, choose_pca_dim(x.shape[0], x.shape[1], dim))
    return preprocess(x, pca), pca


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU, and torch sees CUDA too."""
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return False
    import torch

    return torch.cuda.is_available()


def faiss_lloyd(x: np.ndarray, k: int, niter: int, seed: int, verbose: bool = False, init=None):
    """One faiss k-means run on the CPU over every row: (centroids, objective per iteration, splits).
    It starts from `init` (k, d) when given, else from k random rows. faiss stops once an iteration
    no longer lowers the objective, and refills an empty cluster by splitting a large one."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=verbose, max_points_per_centroid=EVERY_ROW,
                      min_points_per_centroid=1)
    km.train(x, init_centroids=None if init is None else _as_f32(init))
    return km.centroids, list(km.obj), sum(s["nsplit"] for s in km.iteration_stats)


def torch_lloyd(x, k: int, niter: int, seed: int, verbose: bool = False, init=None):
    """The same over the tensor `x`, all `niter` iterations: faiss' torch k-means
    (`faiss.contrib.clustering.kmeans`, whose loop this is, step for step) with a start from `init`,
    which it lacks. On a CUDA tensor the search (`faiss.knn_gpu`), the sums and the centroids stay
    on the GPU; only each iteration's labels come back, for faiss' split of empty clusters."""
    import torch
    from faiss.contrib.clustering import reassign_centroids
    from faiss.contrib.torch.clustering import DatasetAssign, DatasetAssignGPU

    data = DatasetAssignGPU(faiss.StandardGpuResources(), x) if x.is_cuda else DatasetAssign(x)
    rs = np.random.RandomState(seed)
    perm = rs.choice(len(x), size=k, replace=False)  # drawn either way: the splits' random state follows it
    centroids = data.get_subset(perm) if init is None else torch.as_tensor(_as_f32(init), device=x.device)
    obj, nsplit = [], 0
    for i in range(niter):
        assign, distances, sums = data.assign_to(centroids)
        obj.append(distances.sum().item())
        sizes = np.bincount(assign, minlength=k)
        centroids = sums / torch.from_numpy(np.maximum(sizes, 1).astype(np.float32)).to(sums.device)[:, None]
        nsplit += reassign_centroids(sizes, centroids, rs)
        if verbose:
            print(f"  Iteration {i}: objective={obj[-1]:g} nsplit={nsplit}")
    return centroids.cpu().numpy(), obj, nsplit


class KMeans(ClusterMixin, BaseEstimator):
    """k-means on float32 rows, scikit-learn style: faiss on every row given, from random rows
    (and from given centroids).

    k: clusters. niter: Lloyd iterations at most. nredo: runs from random rows, with seeds seed,
    seed + 1, ...; the lowest final objective wins. init: None, or (k, d) centroids that one more
    run starts from, winning ties (DeepCluster's previous groups, whose numbers then stay; nredo
    may then be 0). seed: on the CPU the same seed gives the same centroids and labels (for a given
    number of threads). use_gpu: "auto" (a GPU when faiss and torch see one), True (require one)
    or False; GPU runs are not bit-for-bit reproducible. verbose: faiss' iterations.

    After `fit`: centroids_ (k, d) float32; labels_ (n,) int64, every row's nearest centroid;
    inertia_ (sum of the rows' squared distances to it); obj_ (the winning run's objective per
    iteration); n_split_ (empty clusters refilled by a split); imbalance_factor_, n_empty_; gpu_.
    """

    def __init__(self, k: int = 8, niter: int = 20, nredo: int = 1, seed: int = 0, init: np.ndarray | None = None,
                 use_gpu: bool | str = "auto", verbose: bool = False):
        self.k, self.niter, self.nredo, self.seed, self.init = k, niter, nredo, seed, init
        self.use_gpu, self.verbose = use_gpu, verbose

    def fit(self, x: np.ndarray, y=None) -> KMeans:
        """Learn `k` centroids from every row of `x` (n, d), then label every row."""
        x = _as_f32(x)
        if min(self.k, self.niter) < 1 or self.nredo < (0 if self.init is not None else 1):
            raise ValueError(f"k, niter and nredo must be >= 1 (nredo >= 0 with init), got {self.k}, {self.niter}, "
                             f"{self.nredo}")
        if len(x) < self.k:
            raise ValueError(f"k-means needs at least k={self.k} rows, got {len(x)}")
        if self.init is not None and np.shape(self.init) != (self.k, x.shape[1]):
            raise ValueError(f"init must be (k, d) = ({self.k}, {x.shape[1]}) centroids, got {np.shape(self.init)}")
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {self.use_gpu!r}")
        self.gpu_ = self.use_gpu is not False and gpu_available()
        if self.use_gpu is True and not self.gpu_:
            raise RuntimeError("use_gpu=True, but faiss has no GPU support here or faiss or torch sees no GPU")
        if self.gpu_:
            import torch

            data, lloyd = torch.from_numpy(x).cuda(), torch_lloyd
        else:
            data, lloyd = x, faiss_lloyd
        starts = [(int(self.seed), self.init)] if self.init is not None else []  # first: it wins ties
        starts += [(int(self.seed) + r, None) for r in range(self.nredo)]
        runs = (lloyd(data, int(self.k), int(self.niter), seed, self.verbose, init) for seed, init in starts)
        centroids, obj, self.n_split_ = min(runs, key=lambda run: run[1][-1])
        del data  # the GPU copy
        self.centroids_, self.obj_ = np.ascontiguousarray(centroids, dtype=np.float32), np.asarray(obj, np.float64)
        self.labels_, sq = self.predict_stream([x], return_distances=True)
        self.inertia_ = float(sq.sum(dtype=np.float64))
        sizes = cluster_sizes(self.labels_, self.k)
        self.imbalance_factor_, self.n_empty_ = imbalance_factor(sizes), n_empty_clusters(sizes)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid (L2) of each row of `x`."""
        return self.predict_stream([x])

    def predict_stream(self, chunks: Iterable[np.ndarray], return_distances: bool = False):
        """`predict` over an iterable of (n_i, d) arrays, one chunk in memory at a time (a store's
        shards): the labels, or (labels, each row's exact squared distance to its centroid)."""
        if not hasattr(self, "centroids_"):
            raise RuntimeError("KMeans is not fitted yet: call fit(x) first")
        index = faiss.IndexFlatL2(self.centroids_.shape[1])
        index = faiss.index_cpu_to_all_gpus(index) if self.gpu_ else index
        index.add(self.centroids_)
        labels, sq = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.float32)]
        for chunk in map(_as_f32, chunks):
            labels.append(index.search(chunk, 1)[1][:, 0])
            if return_distances:
                sq.append(sq_distances(chunk, self.centroids_, labels[-1]))
        return (np.concatenate(labels), np.concatenate(sq)) if return_distances else np.concatenate(labels)


def clustering_score(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """The seed article's score: minus the mean squared distance of each row to its centre."""
    diff = np.asarray(x, dtype=np.float64) - np.asarray(centroids, dtype=np.float64)[np.asarray(labels)]
    return -float(np.einsum("ij,ij->i", diff, diff).mean())


def sq_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared distance of each row to its centroid, float32, by direct differences (faiss'
    `fvec_L2sqr_by_idx`: exact to float32 round-off, unlike a search's |x|^2 + |c|^2 - 2 x.c)."""
    x, centroids, labels = _as_f32(x), _as_f32(centroids), np.ascontiguousarray(labels, dtype=np.int64)
    out = np.empty(len(x), dtype=np.float32)
    if len(x):
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(centroids),
                                faiss.swig_ptr(labels), x.shape[1], len(x), 1)
    return out


def cluster_sizes(labels: np.ndarray, k: int) -> np.ndarray:
    """Rows per cluster, length k (zeros for empty clusters)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k]


def imbalance_factor(sizes: np.ndarray) -> float:
    """faiss' imbalance factor k * sum(s^2) / N^2: 1 for equal sizes, k when one cluster has all."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return float(len(sizes) * (sizes**2).sum() / sizes.sum() ** 2) if sizes.sum() > 0 else 0.0


def n_empty_clusters(sizes: np.ndarray) -> int:
    """Clusters with no row (DeepCluster's sampler skips them)."""
    return int((np.asarray(sizes) == 0).sum())


def nmi(a: Sequence, b: Sequence) -> float:
    """Normalised mutual information (sklearn): DeepCluster's stability between epochs."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(_codes(a), _codes(b)))


def _codes(labels: Iterable[Hashable]) -> np.ndarray:
    """Integer codes for any hashable labels (strings, tuples, frozensets of tags...)."""
    table: dict = {}
    return np.fromiter((table.setdefault(v, len(table)) for v in labels), dtype=np.int64)


def ground_truth_scores(labels: Sequence, truth: Sequence) -> dict[str, float]:
    """Cluster labels against one true class per row: {"nmi", "ari", "purity"} (purity: each
    cluster's count of its most common class, summed, over N)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    lab, tru = _codes(labels), _codes(truth)
    if len(lab) != len(tru):
        raise ValueError(f"labels and truth differ in length: {len(lab)} vs {len(tru)}")
    if len(lab) == 0:
        raise ValueError("no rows to score")
    purity = contingency_matrix(lab, tru, sparse=False).max(axis=1).sum() / len(lab)
    return {"nmi": float(normalized_mutual_info_score(tru, lab)), "ari": float(adjusted_rand_score(tru, lab)),
            "purity": float(purity)}
