"""The k-means stage of DeepCluster: PCA-whitening, faiss k-means, scores.

Plain functions and one scikit-learn style estimator on numpy arrays (no Ray, no torch), as in
facebookresearch/deepcluster's `clustering.py`:

- `preprocess_features`: PCA-whitening (eigen_power -0.5) then row-wise L2 normalisation; the
  PCA dimension is chosen from the data size (`choose_pca_dim`) instead of the reference's fixed
  256, which was measured to hurt NMI badly on a few thousand images.
- `KMeans`: greedy k-means++ seeding, faiss Lloyd iterations on a subsample (flat L2 index on
  CPU, or on all visible GPUs: the same code path, only the index differs), split/merge rounds
  that repair what Lloyd cannot (two centroids sharing one true cluster while another straddles
  two), then labels for every row, with one Lloyd update on all rows when it is cheap. Measured
  against faiss' defaults and scikit-learn's MiniBatchKMeans in `scripts/bench_kmeans.py`.
- Scores: the seed article's clustering score, cluster sizes, imbalance factor, empty clusters,
  NMI/ARI/purity against ground truth.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

try:
    import faiss
except ImportError as exc:  # pragma: no cover - depends on the installed extra
    raise ImportError("qdeep's k-means needs faiss: pip install 'qdeep[cpu]' (or 'qdeep[gpu]')") from exc

__all__ = [
    "KMeans",
    "choose_pca_dim",
    "cluster_sizes",
    "clustering_score",
    "fit_pca_whitening",
    "ground_truth_scores",
    "gpu_available",
    "imbalance_factor",
    "n_empty_clusters",
    "nmi",
    "preprocess",
    "preprocess_features",
]

INIT_METHODS = ("kmeans++", "afkmc2", "random")
AUTO_POLISH_MAX_UNSURE = 0.25  # polish="auto" skips the update when more rows than this need a new search
_NO_SUBSAMPLING = 10_000_000  # as the reference: faiss must not subsample again (we already did)


# ----------------------------------------------------------------------------- pre-processing


def choose_pca_dim(n_samples: int, dim: int, requested: int | None = None) -> int:
    """PCA output dimension: `requested` if given, else chosen from the data size; always capped.

    Rule when `requested` is None: ``min(256, max(16, n_samples // 50))`` -- 256 (the reference's
    value) from 12,800 samples up (ImageNet's 1.2M gets 256 as in the paper), about one dimension
    per 50 samples below, never under 16 (measured here: 16-64 dims gave far better NMI than 256
    on a few thousand images). The result is then capped by the feature dim and by
    ``n_samples - 1`` (centred data has rank at most n-1; whitening a zero-variance direction
    divides by zero).
    """
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
    """A faiss PCA-whitening (eigen_power -0.5, as the reference) from `x` to `dim` dims.

    `sample_size` trains on a seeded subset of rows (faiss itself caps training at 1000 points
    per input dimension).
    """
    x = _as_f32(x)
    n, d = x.shape
    if sample_size is not None and n > sample_size:
        x = x[_sample_rows(n, sample_size, np.random.default_rng(seed))]
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
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def preprocess_features(x: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, faiss.PCAMatrix]:
    """The reference's `preprocess_features`: fit PCA-whitening on `x`, apply it, L2-normalise.

    `dim=None` chooses the dimension from the data (`choose_pca_dim`). Returns (features, pca).
    """
    x = _as_f32(x)
    pca = fit_pca_whitening(x, choose_pca_dim(x.shape[0], x.shape[1], dim))
    return preprocess(x, pca), pca


# ----------------------------------------------------------------------------- k-means


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _sample_rows(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """`m` distinct row indices out of `n`, sorted (reading rows in order is faster)."""
    return np.sort(rng.choice(n, size=m, replace=False))


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, n_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; the variant scikit-learn uses).

    Each step draws `n_trials` (2 + ln k) candidates with probability proportional to the squared
    distance to the closest chosen centre and keeps the one that lowers the potential most. The
    greedy choice is what faiss' plain k-means++ lacks: with many well-separated clusters the last
    draws of plain k-means++ often land in an already covered cluster, which Lloyd cannot undo.
    Cost O(k * n_trials * n * d) on the `n` rows given (a subsample).
    """
    n, d = x.shape
    n_trials = n_trials or 2 + int(np.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, d), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(sq - 2.0 * (x @ x[first]) + sq[first], 0.0)  # squared distance to nearest centre
    potential = float(closest.sum(dtype=np.float64))
    for c in range(1, k):
        if potential > 0:
            cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(n_trials) * potential)
            cand = np.minimum(cand, n - 1)
        else:  # every point already coincides with a centre (duplicates): any choice is as good
            cand = rng.integers(n, size=n_trials)
        dist = x @ x[cand].T  # (n, trials): the faster BLAS layout for a few candidates
        dist *= -2.0
        dist += sq[:, None]
        dist += sq[cand][None, :]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[:, None], out=dist)
        pots = dist.sum(axis=0, dtype=np.float64)
        best = int(np.argmin(pots))
        closest, potential = np.ascontiguousarray(dist[:, best]), float(pots[best])
        centers[c] = x[cand[best]]
    return centers


def _two_means(pts: np.ndarray, niter: int = 8, max_fit: int = 2048) -> tuple[np.ndarray, float]:
    """Split one cluster's rows in two; returns (2 centres, SSE of all `pts` under the split).

    Deterministic seeds (the row farthest from the mean, then the row farthest from it); the
    2-means runs on at most `max_fit` evenly spaced rows, the SSE is exact on all rows.
    """
    p64 = pts.astype(np.float64)
    fit = p64[:: max(1, -(-len(p64) // max_fit))]
    a = fit[np.argmax(((fit - fit.mean(axis=0)) ** 2).sum(1))]
    b = fit[np.argmax(((fit - a) ** 2).sum(1))]
    cent = np.stack([a, b])

    def sq_dist(rows: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.maximum((rows**2).sum(1)[:, None] - 2.0 * rows @ c.T + (c**2).sum(1)[None, :], 0.0)

    for _ in range(niter):
        lab = sq_dist(fit, cent).argmin(1)
        new = np.stack([fit[lab == j].mean(0) if np.any(lab == j) else cent[j] for j in (0, 1)])
        if np.allclose(new, cent):
            break
        cent = new
    return cent.astype(np.float32), float(sq_dist(p64, cent).min(1).sum())


def _sum_sq_dist(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> float:
    """Sum of squared distances of rows to their assigned centroid, exact (direct differences)."""
    total = 0.0
    for i in range(0, len(x), chunk):
        diff = x[i : i + chunk] - centroids[labels[i : i + chunk]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def _centroid_means(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Mean of the rows of each cluster (one Lloyd update); empty clusters keep their centroid."""
    from scipy.sparse import csr_matrix

    k, n = len(old), len(x)
    member = csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(member @ x, dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    out = old.astype(np.float64).copy()
    nonempty = counts > 0
    out[nonempty] = sums[nonempty] / counts[nonempty, None]
    return out.astype(np.float32)


class KMeans:
    """k-means on float32 rows with faiss, scikit-learn style (configure, `fit`, `predict`).

    Parameters
    ----------
    k: number of clusters.
    niter: Lloyd iterations of the main run at most.
    tol: stop Lloyd once an iteration lowers the objective by less than this fraction (faiss'
        `early_stop_threshold`; 0 runs until the objective is unchanged or `niter` is reached).
        The split/merge rounds gain far more than the last Lloyd iterations, hence 3e-3.
    seed: seeds every random choice (subsamples, k-means++ draws, faiss' own RNG); on CPU the same
        seed gives the same centroids and labels. DeepCluster passes a new seed every epoch.
    init: "kmeans++" (greedy k-means++ on `init_size` rows, computed here), "afkmc2" or "random"
        (faiss' own initialisations; "random" is faiss' default and the reference's).
    nredo: independent runs with seeds seed, seed+1, ...; the lowest training objective wins.
    max_points_per_centroid: training-set cap: at most k * this many rows (a seeded subsample)
        learn the centroids. The default 16 is chosen for throughput (faiss' own default is 256;
        the reference code uses all rows, 10,000,000). Measured on 200k x 256 overlapping blobs,
        k=1000 (`scripts/bench_kmeans.py --box 1`): NMI vs the true blobs 0.82 at 10, 0.96 at
        16, 0.98 at 32, 0.99 at 64, imbalance 2.3, 1.5, 1.3, 1.1 (time grows with the training
        set); 16 with polish=1: NMI 0.98, imbalance 1.3 for about one more pass over the data.
        On separated blobs all of them find the true clusters. Raise it (or set polish=1) when
        the clusters matter more than the seconds, as in DeepCluster on real features.
    sample_size: optional further cap on training rows (a seeded subsample). The final labels are
        always computed on every row of `x` (`predict_stream` does it chunk by chunk for data that
        does not fit in memory).
    init_size: rows the k-means++ seeding looks at (default ``min(n_train, max(2 * k, 1024))``;
        its cost grows as init_size * k, so about k^2: for k >= ~20,000 prefer init="afkmc2").
    refine: maximum split/merge rounds after Lloyd (0 turns them off). A round finds clusters
        whose two-way split lowers the objective more than merging some other cluster into its
        nearest neighbour raises it, applies the best disjoint swaps, and runs `refine_niter` more
        Lloyd iterations. Every swap lowers the objective on the training rows. On separated
        blobs this is what takes random or k-means++ seeding to the true clusters.
    refine_niter: Lloyd iterations after each refine round.
    polish: Lloyd updates on every row of `x` after training on a subsample: they remove most of
        the error of estimating centroids from `max_points_per_centroid` rows each. An int runs
        that many (each costs up to two passes over `x`); "auto" runs one when Hamerly's bound
        settles at least 75% of the rows (then it costs little more than the labelling pass
        needed anyway: separated clusters) and skips it otherwise. Not run when the training set
        is all of `x`.
    use_gpu: "auto" (all visible GPUs if faiss has GPU support), True (require GPUs) or False.
        GPU runs are not bit-for-bit reproducible.
    verbose: let faiss print its per-iteration log.

    The reference code's k-means is ``KMeans(k, init="random", tol=0, refine=0, polish=0,
    max_points_per_centroid=10_000_000)``.

    Attributes after `fit`
    ----------------------
    centroids_ (k, d) float32; labels_ (n,) int64 for every row of `x`; inertia_ (sum of squared
    distances of all rows to their centroid); obj_ (faiss' per-iteration objective on the training
    rows, main run then refine rounds, from `iteration_stats`); imbalance_factor_ (of labels_);
    n_split_ (empty clusters faiss had to split during Lloyd); n_empty_ (clusters without any row
    in labels_); n_swaps_ (split/merge swaps applied); n_train_ (training rows); n_polish_
    (Lloyd updates applied on all rows); gpu_ (bool).
    """

    def __init__(
        self,
        k: int,
        niter: int = 20,
        tol: float = 3e-3,
        seed: int = 0,
        init: str = "kmeans++",
        nredo: int = 1,
        max_points_per_centroid: int = 16,
        sample_size: int | None = None,
        init_size: int | None = None,
        refine: int = 3,
        refine_niter: int = 3,
        polish: int | str = "auto",
        use_gpu: bool | str = "auto",
        verbose: bool = False,
    ):
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
        if k < 1 or niter < 1 or nredo < 1 or max_points_per_centroid < 1:
            raise ValueError("k, niter, nredo and max_points_per_centroid must be >= 1")
        if not 0.0 <= tol <= 1.0:
            raise ValueError(f"tol must be in [0, 1], got {tol}")
        if use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        self.k = int(k)
        self.niter = int(niter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.init = init
        self.nredo = int(nredo)
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.sample_size = sample_size
        self.init_size = init_size
        self.refine = int(refine)
        self.refine_niter = int(refine_niter)
        if polish != "auto" and not (isinstance(polish, int) and polish >= 0):
            raise ValueError(f"polish must be 'auto' or an int >= 0, got {polish!r}")
        self.polish = polish
        self.use_gpu = use_gpu
        self.verbose = verbose

    # -- index: the only thing that differs between CPU and GPU

    def _want_gpu(self) -> bool:
        if self.use_gpu is True and not gpu_available():
            raise RuntimeError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
        return bool(self.use_gpu) and gpu_available()

    def _new_index(self, d: int):
        """A flat L2 index: on CPU, or replicated on all visible GPUs (queries split between them).

        One index serves a whole `fit` (reset between uses), so GPU resources are set up once.
        """
        index = faiss.IndexFlatL2(d)
        if self.gpu_:
            index = faiss.index_cpu_to_all_gpus(index)
        return index

    # -- building blocks (all take the index to use)

    def _lloyd(self, index, x: np.ndarray, centroids: np.ndarray | None, niter: int, seed: int):
        """faiss Lloyd iterations on all rows of `x` from `centroids` (or faiss' own init if None).

        Returns (centroids, per-iteration objective, empty clusters split).
        """
        n, d = x.shape
        cp = faiss.ClusteringParameters()
        cp.niter = niter
        cp.seed = seed
        cp.early_stop_threshold = self.tol
        cp.verbose = bool(self.verbose)
        cp.max_points_per_centroid = _NO_SUBSAMPLING  # x is already the training set
        cp.min_points_per_centroid = 1  # small training sets are deliberate here: no warning
        if centroids is None:
            methods = {"random": faiss.ClusteringInitMethod_RANDOM, "afkmc2": faiss.ClusteringInitMethod_AFK_MC2}
            cp.init_method = methods[self.init]
        clus = faiss.Clustering(d, self.k, cp)
        if centroids is not None:
            faiss.copy_array_to_vector(np.ascontiguousarray(centroids, dtype=np.float32).ravel(), clus.centroids)
        index.reset()
        clus.train(x, index)
        cent = faiss.vector_to_array(clus.centroids).reshape(self.k, d).astype(np.float32)
        stats = [clus.iteration_stats.at(i) for i in range(clus.iteration_stats.size())]
        return cent, [float(s.obj) for s in stats], sum(int(s.nsplit) for s in stats)

    @staticmethod
    def _search(index, x: np.ndarray, centroids: np.ndarray, nn: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, ids) of the `nn` nearest centroids of each row of `x`."""
        index.reset()
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        dist, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), nn)
        return np.maximum(dist, 0.0), ids.astype(np.int64)

    def _swap_round(self, index, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, int]:
        """One split/merge round on the training rows; returns (new centroids, swaps applied).

        Merge cost of cluster j into its nearest centroid j2 (exact, assignments fixed):
        n_j n_j2 / (n_j + n_j2) * |c_j - c_j2|^2 (zero for an empty cluster). Split gain of
        cluster s: its SSE minus its SSE under a 2-means split. A swap merges j into j2 and
        reuses centroid j for one half of s; it is applied when gain > cost, so the objective on
        the training rows drops by gain - cost; each cluster takes part in one swap per round.
        The clusters with the largest SSE (a tenth of k, at least 8) are the split candidates.
        """
        k = self.k
        if k < 3:
            return centroids, 0
        dist, lab = self._search(index, x, centroids)
        dist, lab = dist[:, 0].astype(np.float64), lab[:, 0]
        sizes = np.bincount(lab, minlength=k).astype(np.float64)
        sse = np.bincount(lab, weights=dist, minlength=k)
        total = float(sse.sum())
        if total <= 0:
            return centroids, 0
        # nearest other centroid (2-NN among the centroids, skipping self; robust to duplicates)
        cdist, cnn = self._search(index, centroids, centroids, nn=2)
        is_self = cnn[:, 0] == np.arange(k)
        other = np.where(is_self, cnn[:, 1], cnn[:, 0])
        odist = np.where(is_self, cdist[:, 1], cdist[:, 0]).astype(np.float64)
        pair = sizes + sizes[other]
        cost = np.divide(sizes * sizes[other], pair, out=np.zeros(k), where=pair > 0) * odist
        # split gains of the clusters with the largest SSE
        order = np.argsort(lab, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))])
        splits = []
        for j in np.argsort(-sse, kind="stable")[: min(k, max(8, k // 10))]:
            if sizes[j] >= 2:
                halves, split_sse = _two_means(x[order[starts[j] : starts[j + 1]]])
                splits.append((sse[j] - split_sse, int(j), halves))
        splits.sort(key=lambda t: (-t[0], t[1]))
        merges = [(int(j), int(other[j])) for j in np.argsort(cost, kind="stable")]
        eps = 1e-7 * total
        used: set[int] = set()
        new = centroids.copy()
        swaps = 0
        first = 0  # merges before this index involve a used cluster (used only grows)
        for gain, s, halves in splits:
            if s in used:
                continue
            while first < k and (merges[first][0] in used or merges[first][1] in used):
                first += 1
            j = next((a for a, b in merges[first:] if s not in (a, b) and a not in used and b not in used), None)
            if j is None or gain <= cost[j] + eps:
                continue
            j2 = int(other[j])
            if pair[j] > 0:
                new[j2] = (sizes[j] * centroids[j] + sizes[j2] * centroids[j2]) / pair[j]
            new[s], new[j] = halves[0], halves[1]
            used.update((s, j, j2))
            swaps += 1
        return new, swaps

    def _fit_once(self, index, xt: np.ndarray, seed: int):
        """Seed, Lloyd, split/merge rounds on the training rows `xt`: (centroids, obj, nsplit, swaps)."""
        rng = np.random.default_rng(seed)
        n = xt.shape[0]
        init = None
        if self.init == "kmeans++":
            m = min(n, self.init_size or max(2 * self.k, 1024))
            init = _kmeans_plusplus(xt if m == n else xt[_sample_rows(n, m, rng)], self.k, rng)
        cent, obj, nsplit = self._lloyd(index, xt, init, self.niter, seed)
        swaps = 0
        for r in range(self.refine):
            cent2, n_sw = self._swap_round(index, xt, cent)
            if n_sw == 0:
                break
            swaps += n_sw
            cent, obj2, ns2 = self._lloyd(index, xt, cent2, self.refine_niter, seed + 7919 * (r + 1))
            obj += obj2
            nsplit += ns2
        return cent, obj, nsplit, swaps

    def _polish_and_label(self, index, x: np.ndarray, cent: np.ndarray, polish: int | str):
        """Lloyd updates on all rows (`polish` of them), then the nearest-centroid label of every row.

        Returns (centroids, labels, updates applied). After the last update a row keeps its label
        without a new search when its distance to its own centroid plus that centroid's shift
        stays below its distance to the second nearest minus the largest shift (Hamerly's bound,
        with a margin for float32 round-off); only the other rows are searched again. On separated
        data the polish is then nearly free (one pass over `x`, which labelling needs anyway); on
        overlapping data most rows need a second search, and "auto" then keeps the trained
        centroids and the labels of the first pass instead.
        """
        n = len(x)
        if polish == 0 or self.k < 2:
            return cent, self._search(index, x, cent)[1][:, 0], 0
        updates = 1 if polish == "auto" else int(polish)
        for it in range(updates):
            sq, nn = self._search(index, x, cent, nn=2)
            lab = nn[:, 0].copy()
            new = _centroid_means(x, lab, cent)
            if it + 1 < updates:
                cent = new
        shift = np.sqrt(((new.astype(np.float64) - cent) ** 2).sum(1))
        d1 = np.sqrt(sq[:, 0].astype(np.float64))
        d2 = np.sqrt(sq[:, 1].astype(np.float64))
        # faiss computes |x|^2 + |c|^2 - 2 x.c in float32: allow an error of 1e-5 of the norms
        norms = np.einsum("ij,ij->i", x, x, dtype=np.float64) + float((cent.astype(np.float64) ** 2).sum(1).max())
        margin = 2.0 * np.sqrt(1e-5 * norms)
        unsure = np.flatnonzero(d1 + shift[lab] + margin >= d2 - shift.max())
        if polish == "auto" and len(unsure) > AUTO_POLISH_MAX_UNSURE * n:
            return cent, lab, 0  # exact labels of the trained centroids
        if len(unsure):
            lab[unsure] = self._search(index, x[unsure], new)[1][:, 0]
        return new, lab, updates

    # -- public API

    def fit(self, x: np.ndarray) -> KMeans:
        """Learn `k` centroids from `x` (n, d) float32, then label every row of `x`."""
        x = _as_f32(x)
        n, d = x.shape
        if n < self.k:
            raise ValueError(f"k-means needs at least k={self.k} rows, got {n}")
        self.gpu_ = self._want_gpu()
        index = self._new_index(d)
        n_train = max(self.k, min(n, self.k * self.max_points_per_centroid, self.sample_size or n))
        xt = x if n_train == n else x[_sample_rows(n, n_train, np.random.default_rng(self.seed))]
        best = None
        for r in range(self.nredo):
            run = self._fit_once(index, xt, self.seed + r)
            if best is None or run[1][-1] < best[1][-1]:
                best = run
        centroids, obj, self.n_split_, self.n_swaps_ = best
        self.obj_ = np.asarray(obj, dtype=np.float64)
        self.n_train_ = n_train
        polish = self.polish if n_train < n else 0
        self.centroids_, self.labels_, self.n_polish_ = self._polish_and_label(index, x, centroids, polish)
        self.inertia_ = _sum_sq_dist(x, self.centroids_, self.labels_)
        sizes = cluster_sizes(self.labels_, self.k)
        self.imbalance_factor_ = imbalance_factor(sizes)
        self.n_empty_ = n_empty_clusters(sizes)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "centroids_"):
            raise RuntimeError("KMeans is not fitted yet: call fit(x) first")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid (L2) for each row of `x`."""
        return self.predict_stream([x])

    def predict_stream(self, chunks: Iterable[np.ndarray]) -> np.ndarray:
        """`predict` over an iterable of (n_i, d) arrays, one chunk in memory at a time.

        For features stored in shards: only the labels (8 bytes a row) are kept.
        """
        self._check_fitted()
        index = self._new_index(self.centroids_.shape[1])
        index.add(self.centroids_)
        out = [np.empty(0, dtype=np.int64)]
        for chunk in chunks:
            chunk = _as_f32(chunk)
            if len(chunk):
                out.append(index.search(chunk, 1)[1][:, 0].astype(np.int64))
        return np.concatenate(out)

    def fit_predict(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).labels_


# ----------------------------------------------------------------------------- scores


def clustering_score(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """The seed article's score: minus the mean squared distance of each row to its centre."""
    x = np.asarray(x, dtype=np.float64)
    diff = x - np.asarray(centroids, dtype=np.float64)[np.asarray(labels)]
    return -float(np.einsum("ij,ij->i", diff, diff).mean())


def cluster_sizes(labels: np.ndarray, k: int) -> np.ndarray:
    """Rows per cluster, length k (zeros for empty clusters)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k]


def imbalance_factor(sizes: np.ndarray) -> float:
    """faiss' imbalance factor k * sum(s^2) / N^2: 1 for equal sizes, k when one cluster has all."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    return float(len(sizes) * (sizes**2).sum() / total**2) if total > 0 else 0.0


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
    """Cluster labels against one true class per row: {"nmi", "ari", "purity"}.

    Purity: for each cluster the count of its most common true class, summed, over N.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    lab, tru = _codes(labels), _codes(truth)
    if len(lab) != len(tru):
        raise ValueError(f"labels and truth differ in length: {len(lab)} vs {len(tru)}")
    if len(lab) == 0:
        raise ValueError("no rows to score")
    cont = contingency_matrix(lab, tru, sparse=False)
    return {
        "nmi": float(normalized_mutual_info_score(tru, lab)),
        "ari": float(adjusted_rand_score(tru, lab)),
        "purity": float(cont.max(axis=1).sum() / len(lab)),
    }
