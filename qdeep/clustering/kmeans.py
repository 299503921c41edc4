"""The k-means stage of DeepCluster: PCA-whitening, faiss k-means, scores.

Plain functions and one scikit-learn style estimator on numpy arrays (no Ray, no torch), as in
facebookresearch/deepcluster's `clustering.py`:

- `preprocess_features`: PCA-whitening (eigen_power -0.5) then row-wise L2 normalisation; the
  PCA dimension is chosen from the data size (`choose_pca_dim`) instead of the reference's fixed
  256, which was measured to hurt NMI badly on a few thousand images.
- `KMeans`: greedy k-means++ seeding, Lloyd iterations on a subsample with split/merge rounds
  that repair what Lloyd cannot (two centroids sharing one true cluster while another straddles
  two), then labels for every row, with one Lloyd update on all rows when it is cheap. All
  nearest-centroid searches go through one faiss flat L2 index (on CPU, or on all visible GPUs:
  the same code path, only the index differs); Elkan's and Hamerly's bounds skip the searches
  whose answer is already known, so labels stay exact. Measured against faiss' defaults and
  scikit-learn's MiniBatchKMeans in `scripts/bench_kmeans.py`.
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
    "sq_distances",
]

INIT_METHODS = ("kmeans++", "afkmc2", "random")
AUTO_POLISH_MAX_UNSURE = 0.25  # polish="auto" skips the update when more rows than this need a new search
_NO_SUBSAMPLING = 10_000_000  # as the reference: faiss must not subsample again (we already did)
FLOAT32_REL_ERR = 1e-5  # faiss' float32 |x|^2 + |c|^2 - 2 x.c errs by less than this fraction of |x|^2 + |c|^2
_SPLIT_EPS = 1.0 / 1024  # faiss' relative nudge when it splits a cluster to refill an empty one
_MAX_UNSURE_FOR_BOUNDS = 0.5  # bounds that leave more rows unsure than this are not kept up (see _Labels)
_SPLIT_CANDIDATES = 0.1  # fraction of the clusters (those with the largest SSE) a split/merge round tries to split
_MEANS_BLOCK = 32768  # rows per block of a Lloyd update's sums (blocks run in parallel)
_PAIRWISE_MAX_ROWS = 8192  # k-means++ precomputes the distances between its rows up to this many (256 MB)


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
    The `n` rows given are a subsample: up to `_PAIRWISE_MAX_ROWS` of them, all their pairwise
    distances are computed once (one GEMM) and each step only reads `n_trials` rows of that
    matrix; above, each step computes the candidates' distances to all rows (O(n_trials n d)).
    """
    n, d = x.shape
    n_trials = n_trials or 2 + int(np.log(k))
    pairwise = np.maximum(faiss.pairwise_distances(x, x), 0.0) if n <= _PAIRWISE_MAX_ROWS else None

    def dist_to(rows: np.ndarray) -> np.ndarray:  # (len(rows), n) squared distances, a new array
        return pairwise[rows] if pairwise is not None else np.maximum(faiss.pairwise_distances(x[rows], x), 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    closest = dist_to(chosen[:1])[0]  # squared distance to the nearest centre
    potential = float(closest.sum(dtype=np.float64))
    for c in range(1, k):
        if potential > 0:
            cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(n_trials) * potential)
            cand = np.minimum(cand, n - 1)
        else:  # every point already coincides with a centre (duplicates): any choice is as good
            cand = rng.integers(n, size=n_trials)
        dist = dist_to(cand)
        np.minimum(dist, closest[None, :], out=dist)
        pots = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(pots))
        closest, potential = dist[best], float(pots[best])
        chosen[c] = cand[best]
    return x[chosen]


def _first_max(values: np.ndarray, groups: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index of the first largest value of each group (rows sorted by group, `starts` their offsets)."""
    return np.lexsort((-values, groups))[starts]


def _two_means(x: np.ndarray, groups: Sequence[np.ndarray], niter: int = 8, max_fit: int = 2048):
    """Split several clusters in two at once: `groups` holds the row indices (into `x`) of each, >= 2 rows.

    Returns (centres (S, 2, d) float32, SSE of each cluster's rows under its split (S,) float64).
    Per cluster: deterministic seeds (the row farthest from the mean, then the row farthest from
    it), then 2-means on at most `max_fit` evenly spaced rows (all clusters together, each row
    compared with its own cluster's two centres only); the SSE is exact on all rows.
    """
    from scipy.sparse import csr_matrix

    n_groups = len(groups)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    grp = np.repeat(np.arange(n_groups), sizes)
    pts = x[np.concatenate(groups)]
    step = np.repeat(np.maximum(1, -(-sizes // max_fit)), sizes)
    fit = (np.arange(len(pts)) - np.repeat(starts, sizes)) % step == 0
    fpts, fgrp = (pts, grp) if fit.all() else (np.ascontiguousarray(pts[fit]), grp[fit])
    fsizes = np.bincount(fgrp, minlength=n_groups)
    fstarts = np.concatenate([[0], np.cumsum(fsizes)[:-1]])
    mean = np.add.reduceat(fpts, fstarts) / fsizes[:, None]
    a = fpts[_first_max(_sq_dist_by_idx(fpts, mean, fgrp), fgrp, fstarts)]
    b = fpts[_first_max(_sq_dist_by_idx(fpts, a, fgrp), fgrp, fstarts)]
    cent = np.stack([a, b], axis=1).reshape(2 * n_groups, -1)  # centres 2g, 2g + 1 for group g
    pair = np.stack([2 * fgrp, 2 * fgrp + 1], axis=1)
    rows = np.arange(len(fpts))
    for _ in range(niter):
        key = pair[rows, np.argmin(_sq_dist_by_idx(fpts, cent, pair), axis=1)]  # ties stay with the first
        counts = np.bincount(key, minlength=2 * n_groups)
        member = csr_matrix((np.ones(len(fpts), dtype=np.float32), (key, rows)), shape=(len(cent), len(fpts)))
        sums = member @ fpts
        new = cent.copy()
        new[counts > 0] = sums[counts > 0] / counts[counts > 0, None]
        if np.array_equal(new, cent):
            break
        cent = new
    sse = _sq_dist_by_idx(pts, cent, np.stack([2 * grp, 2 * grp + 1], axis=1)).min(axis=1)
    return cent.reshape(n_groups, 2, -1), np.bincount(grp, weights=sse, minlength=n_groups)


def _cluster_means(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the rows of each cluster, rows per cluster): one Lloyd update; empty clusters keep `old`.

    Sums by a sparse (k, n) membership matrix times `x`, in blocks of `_MEANS_BLOCK` rows added in
    order (the same result on any number of threads); scipy releases the GIL there, so the blocks
    run on faiss' number of threads.
    """
    from scipy.sparse import csr_matrix

    k, n = len(old), len(x)

    def block_sums(rows: slice) -> np.ndarray:
        m = len(labels[rows])
        return csr_matrix((np.ones(m, dtype=np.float32), (labels[rows], np.arange(m))), shape=(k, m)) @ x[rows]

    blocks = [slice(a, a + _MEANS_BLOCK) for a in range(0, n, _MEANS_BLOCK)]
    threads = min(faiss.omp_get_max_threads(), len(blocks))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(block_sums, blocks))
    else:
        parts = [block_sums(b) for b in blocks]
    sums = parts[0].astype(np.float64)
    for part in parts[1:]:
        sums += part
    counts = np.bincount(labels, minlength=k)
    out = old.astype(np.float64)
    nonempty = counts > 0
    out[nonempty] = sums[nonempty] / counts[nonempty, None]
    return out.astype(np.float32), counts


def _split_empty(cent: np.ndarray, counts: np.ndarray, skip: set[int], rng: np.random.Generator) -> int:
    """faiss' remedy for empty clusters, in place: each takes half of a cluster drawn with probability
    proportional to its size - 1, both centroids nudged apart by a relative 1/1024. Returns splits made."""
    counts = counts.astype(np.int64).copy()
    sign = np.where(np.arange(cent.shape[1]) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS).astype(np.float32)
    n_split = 0
    for ci in np.flatnonzero(counts == 0):
        if int(ci) in skip:
            continue
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() <= 0:
            break
        cj = int(rng.choice(len(counts), p=weights / weights.sum()))
        cent[ci] = cent[cj] * (1 + sign)
        cent[cj] = cent[cj] * (1 - sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        n_split += 1
    return n_split


def _sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row (faiss, multi-threaded), float64."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(len(x), dtype=np.float32)
    if len(x):
        faiss.fvec_norms_L2sqr(faiss.swig_ptr(out), faiss.swig_ptr(x), x.shape[1], len(x))
    return out.astype(np.float64)


def _sq_dist_by_idx(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared distances of row i of `x` to rows ids[i] (or ids[i, :]) of `y`, float32, by direct differences.

    faiss' `fvec_L2sqr_by_idx` (sum of squared differences, multi-threaded, O(n d) per column of
    ids): exact to float32 round-off, unlike a flat search's |x|^2 + |c|^2 - 2 x.c.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape, dtype=np.float32)
    if len(x):
        ny = 1 if ids.ndim == 1 else ids.shape[1]
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(y), faiss.swig_ptr(ids),
                                x.shape[1], len(x), ny)
    return out


def _own_dist(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Distance (not squared) of each row of `x` to centroid `labels[i]`, float64, by direct differences."""
    return np.sqrt(_sq_dist_by_idx(x, centroids, labels).astype(np.float64))


def _max_sq_norm(centroids: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64).max())


class _Labels:
    """Exact nearest-centroid labels of the rows of `x`, kept exact as the centroids move.

    Per row: `lab` (nearest centroid of `cent`), `dist` (the exact distance to it, from direct
    differences) and `lower` (a lower bound on the distance to every other centroid). When the
    centroids move (`move`), rows are searched again only when no bound settles them:
      - Hamerly: `lower` minus the largest move of another centroid (`lower` is the distance to
        the 2nd nearest centroid when a row was searched, or Elkan's bound below);
      - Elkan: for j != a, |x - c_j| >= |c_a - c_j| - |x - c_a| >= gap_a - dist, where gap_a is the
        distance from c_a to its nearest other centroid: settles every row closer to its centroid
        than half that gap (separated clusters: nearly all rows, whatever the centroids did).
    When the bounds leave more than half the rows unsure (overlapping clusters), the searches
    ask for the nearest centroid only, and Elkan's bound (one k x k search) is skipped while it
    settles under 1% of the rows it is tried on.
    A row is settled when dist + margin < lower; the margin, three times sqrt(FLOAT32_REL_ERR *
    (|x|^2 + max |c|^2)), covers the float32 round-off of the faiss distances behind `lower` and
    of the flat search it must agree with, so settled rows get the label a flat search would
    give. `n_searched` counts searched rows.
    """

    def __init__(self, km: KMeans, index, x: np.ndarray, cent: np.ndarray, gaps: np.ndarray | None = None):
        self.km, self.index, self.x = km, index, x
        self.sq = _sq_norms(x)
        self.n_searched = 0
        self.unsure = 0.0  # fraction of rows the bounds left unsure in the last move
        self._moves, self._elkan_useful = 0, True
        self._set(cent, gaps)
        n = len(x)
        self.lab = np.zeros(n, dtype=np.int64)
        self.dist = np.zeros(n)
        self.lower = np.zeros(n)

    def _set(self, cent: np.ndarray, gaps: np.ndarray | None = None) -> None:
        self.cent = cent
        self._gaps = gaps
        self._cmax2 = _max_sq_norm(cent)

    def margin(self, rows: np.ndarray | None = None) -> np.ndarray:
        sq = self.sq if rows is None else self.sq[rows]
        return 3.0 * np.sqrt(FLOAT32_REL_ERR * (sq + self._cmax2))

    def gaps(self) -> np.ndarray:
        """Distance from each centroid to its nearest other centroid, minus its float32 error."""
        if self._gaps is None:
            self._gaps = _centroid_gaps(self.km, self.index, self.cent)
        return self._gaps

    def search(self, rows: np.ndarray | None = None, nn: int = 2, plan: _Projection | None = None) -> None:
        """Label `rows` (all when None) from scratch: a flat search, or `plan`'s candidates where they are certain."""
        x = self.x if rows is None else self.x[rows]
        n = len(x)
        if n == 0:
            return
        lab, dist, lower = np.empty(n, dtype=np.int64), np.empty(n), np.empty(n)
        todo = None  # all
        if plan is not None:
            cand, e, low, ok = self.candidates(x, rows, plan)
            lab[ok], dist[ok], lower[ok] = cand[ok], e[ok], low[ok]
            todo = np.flatnonzero(~ok)
            if len(todo) == n:
                todo = None
        xs = x if todo is None else x[todo]
        if len(xs):
            sq, ids = self.km._search(self.index, xs, self.cent, nn)
            found = ids[:, 0]
            e = _own_dist(xs, self.cent, found)
            if nn >= 2 and len(self.cent) >= 2:
                low = np.sqrt(sq[:, 1].astype(np.float64))
            elif self._gaps is not None:  # Elkan's bound, free when the gaps are known
                low = self._gaps[found] - e
            else:
                low = np.full(len(xs), -np.inf)
            sel = slice(None) if todo is None else todo
            lab[sel], dist[sel], lower[sel] = found, e, low
            self.n_searched += len(xs)
            self.km._rows_searched += len(xs)
        sel = slice(None) if rows is None else rows
        self.lab[sel], self.dist[sel], self.lower[sel] = lab, dist, lower

    def candidates(self, x: np.ndarray, rows: np.ndarray | None, plan: _Projection):
        """`plan`'s candidate for rows `x` (= self.x[rows]): (candidate, its distance, Elkan's lower bound, certain)."""
        cand = plan.candidates(x)
        e = _own_dist(x, self.cent, cand)
        low = self.gaps()[cand] - e
        return cand, e, low, e + self.margin(rows) < low

    def move(self, new: np.ndarray, budget: float | None = None) -> int | None:
        """The centroids move to `new`: update the labels, searching only the rows no bound settles.

        Returns the number of rows searched; with a `budget`, gives up (changing nothing and
        returning None) when more rows than that would need a search.
        """
        new = np.ascontiguousarray(new, dtype=np.float32)
        shift = np.sqrt(((new.astype(np.float64) - self.cent) ** 2).sum(1))
        lower = self.lower.copy()
        if len(shift) >= 2:
            top = np.argpartition(-shift, 1)[:2]
            j1, j2 = (top[0], top[1]) if shift[top[0]] >= shift[top[1]] else (top[1], top[0])
            lower = lower - np.where(self.lab == j1, shift[j2], shift[j1])  # Hamerly
        dist = _own_dist(self.x, new, self.lab)
        old_cent, old_gaps = self.cent, self._gaps
        self._set(new)
        margin = self.margin()
        unsure = dist + margin >= lower
        self._moves += 1
        # Elkan's bound, with the gaps between the new centroids (a k x k search): skipped while it
        # settles almost nothing (overlapping clusters), but tried again every 4th move
        if unsure.any() and (self._elkan_useful or self._moves % 4 == 0):
            rows = np.flatnonzero(unsure)
            lower[rows] = np.maximum(lower[rows], self.gaps()[self.lab[rows]] - dist[rows])
            unsure[rows] = dist[rows] + margin[rows] >= lower[rows]
            self._elkan_useful = len(rows) - np.count_nonzero(unsure[rows]) >= 0.01 * len(rows)
        rows = np.flatnonzero(unsure)
        if budget is not None and len(rows) > budget:
            self._set(old_cent, old_gaps)
            return None
        self.dist, self.lower = dist, lower
        self.unsure = len(rows) / max(1, len(self.x))
        # when the bounds settle few rows they will not next time either: skip the second neighbour
        self.search(rows if len(rows) < len(self.x) else None, nn=1 if self.unsure > _MAX_UNSURE_FOR_BOUNDS else 2)
        return len(rows)


def _centroid_gaps(km: KMeans, index, cent: np.ndarray) -> np.ndarray:
    """Distance from each centroid to its nearest other centroid (0 for duplicates), minus its float32 error."""
    k = len(cent)
    if k < 2:
        return np.full(k, np.inf)
    sq, ids = km._search(index, cent, cent, 2)
    is_self = ids[:, 0] == np.arange(k)
    other = np.where(is_self, sq[:, 1], sq[:, 0]).astype(np.float64)
    return np.sqrt(other) - np.sqrt(FLOAT32_REL_ERR * 2.0 * _max_sq_norm(cent))


def _principal_axes(cent: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of the projection x -> A x + b onto the top `dim` principal directions of the centroids.

    A (dim, d) has orthonormal rows by decreasing variance, so a prefix of its rows is the
    projection to fewer dimensions; faiss' PCAMatrix computes them.
    """
    pca = faiss.PCAMatrix(cent.shape[1], dim)
    pca.train(np.ascontiguousarray(cent, dtype=np.float32))
    return faiss.vector_to_array(pca.A).reshape(dim, cent.shape[1]), faiss.vector_to_array(pca.b)


class _Projection:
    """Candidate nearest centroids from a flat search in a few principal directions of the centroids.

    Distances shrink under an orthogonal projection, so the candidate is only a guess; `_Labels`
    keeps it where Elkan's bound proves it right and searches the other rows in full.
    """

    def __init__(self, km: KMeans, axes: tuple[np.ndarray, np.ndarray], cent: np.ndarray, dim: int):
        a, b = axes
        self.km, self.dim, self.axes = km, dim, (a[:dim], b[:dim])
        self.transform = faiss.LinearTransform(a.shape[1], dim, True)
        faiss.copy_array_to_vector(np.ascontiguousarray(a[:dim], dtype=np.float32).ravel(), self.transform.A)
        faiss.copy_array_to_vector(np.ascontiguousarray(b[:dim], dtype=np.float32), self.transform.b)
        self.transform.is_trained = True
        self.cent = self.transform.apply(np.ascontiguousarray(cent, dtype=np.float32))
        self.index = km._new_index(dim)

    def candidates(self, x: np.ndarray) -> np.ndarray:
        return self.km._search(self.index, self.transform.apply(x), self.cent, 1)[1][:, 0]


class KMeans:
    """k-means on float32 rows with faiss, scikit-learn style (configure, `fit`, `predict`).

    Parameters
    ----------
    k: number of clusters.
    niter: Lloyd iterations at most (split/merge rounds included).
    tol: stop once an iteration lowers the objective on the training rows by at most this
        fraction (as faiss' `early_stop_threshold`; 0 runs until the objective stops decreasing
        or `niter` is reached). 5e-3: with a split/merge round in every update an iteration gains
        about 1% for a while; on the benchmark's overlapping blobs 3e-3 runs two more iterations
        for NMI 0.972 -> 0.976, 1e-2 stops after about 6 at NMI 0.92 (3 seeds).
    seed: seeds every random choice (subsamples, k-means++ draws, faiss' own RNG); on CPU the same
        seed gives the same centroids and labels (for a given number of threads: faiss' BLAS
        rounds differently on 1 and 2). DeepCluster passes a new seed every epoch.
    init: "kmeans++" (greedy k-means++ on `init_size` rows, computed here), "afkmc2" or "random"
        (faiss' own initialisations; "random" is faiss' default and the reference's).
    nredo: independent runs with seeds seed, seed+1, ...; the lowest training objective wins.
    max_points_per_centroid: training-set cap: at most k * this many rows (a seeded subsample)
        learn the centroids. The default 16 is chosen for throughput (faiss' own default is 256;
        the reference code uses all rows, 10,000,000). Measured on 200k x 256 overlapping blobs,
        k=1000 (`scripts/bench_kmeans.py --box 1`): NMI vs the true blobs 0.81 at 10, 0.97 at
        16, 1.00 at 32 and 64, imbalance 2.3, 1.2, 1.00, 1.00, searching 0.7, 1, 1.35 and 1.8
        times as many rows as at 16 (time follows); 16 with polish=1: NMI 0.99, imbalance 1.08,
        1.55 times the rows. On separated blobs all of them find the true clusters. Raise it (or
        set polish=1) when the clusters matter more than the seconds, as in DeepCluster on real
        features.
    sample_size: optional further cap on training rows (a seeded subsample). The final labels are
        always computed on every row of `x` (`predict_stream` does it chunk by chunk for data that
        does not fit in memory).
    init_size: rows the k-means++ seeding looks at (default ``min(n_train, max(2 * k, 1024))``;
        its cost grows as init_size * k, so about k^2: for k >= ~20,000 prefer init="afkmc2").
    refine: maximum split/merge rounds (0 turns them off). A round goes with a Lloyd update: it
        finds clusters whose two-way split lowers the objective more than merging some other
        cluster into its nearest neighbour raises it and applies the best disjoint swaps (every
        swap lowers the objective on the training rows); the rounds stop early when one finds
        no swap. On separated blobs this is what takes random or k-means++ seeding to the true
        clusters; on overlapping blobs it keeps improving the clusters for ~10 rounds.
    refine_niter: Lloyd updates from one split/merge round to the next (1: every update, from
        the first; each round then costs no search of its own).
    polish: Lloyd updates on every row of `x` after training on a subsample: they remove most of
        the error of estimating centroids from `max_points_per_centroid` rows each. An int runs
        that many; "auto" runs one when the bounds settle at least 75% of the rows (then it costs
        little more than the labelling pass needed anyway: separated clusters) and skips it
        otherwise, without trying when the training rows show it cannot succeed (overlapping
        clusters: then the labelling pass does not need the second neighbours either). Not run
        when the training set is all of `x`.
    use_gpu: "auto" (all visible GPUs if faiss has GPU support), True (require GPUs) or False.
        GPU runs are not bit-for-bit reproducible.
    verbose: print a line per Lloyd iteration (objective, rows searched).

    How the work is kept small (every label stays exact: the nearest centroid a flat search
    would give; see `_Labels`): Lloyd runs here, not in faiss, so an iteration searches only the
    rows whose label neither Elkan's nor Hamerly's bound settles (on separated clusters, almost
    none after the first iteration; on overlapping ones, all of them), and a split/merge round
    reuses the labels and exact distances of its iteration. The labelling pass over all rows
    takes a candidate centroid from a flat search in a few principal directions of the centroids
    (1/16 to 1/4 of the dimensions, when the training rows show that Elkan's bound will confirm
    enough of the candidates) and searches in full only the rows it leaves unsure; `predict`
    does the same. Exact distances come from direct differences (`fvec_L2sqr_by_idx`), not from
    the |x|^2 + |c|^2 - 2 x.c of a search, and every heavy operation runs in faiss (one OpenMP
    thread pool: numpy's BLAS threads would compete with it).

    The reference code's k-means is ``KMeans(k, init="random", tol=0, refine=0, polish=0,
    max_points_per_centroid=10_000_000)``.

    Attributes after `fit`
    ----------------------
    centroids_ (k, d) float32; labels_ (n,) int64 for every row of `x`; inertia_ (sum of squared
    distances of all rows to their centroid); obj_ (the objective of each Lloyd iteration on the
    training rows); imbalance_factor_ (of labels_); n_split_ (empty clusters split during Lloyd,
    as faiss does); n_empty_ (clusters without any row in labels_); n_swaps_ (split/merge swaps
    applied); n_train_ (training rows); n_polish_ (Lloyd updates applied on all rows);
    n_searched_ (rows searched against all centroids in training and labelling together; a
    plain labelling pass alone would search all n); gpu_ (bool).
    """

    def __init__(
        self,
        k: int,
        niter: int = 20,
        tol: float = 5e-3,
        seed: int = 0,
        init: str = "kmeans++",
        nredo: int = 1,
        max_points_per_centroid: int = 16,
        sample_size: int | None = None,
        init_size: int | None = None,
        refine: int = 10,
        refine_niter: int = 1,
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

    @staticmethod
    def _search(index, x: np.ndarray, centroids: np.ndarray, nn: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, ids) of the `nn` nearest centroids of each row of `x`."""
        index.reset()
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        dist, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), nn)
        return np.maximum(dist, 0.0), ids.astype(np.int64)

    # -- training on the subsample

    def _init_centroids(self, xt: np.ndarray, seed: int) -> np.ndarray:
        n, d = xt.shape
        if self.init == "kmeans++":
            rng = np.random.default_rng(seed)
            m = min(n, self.init_size or max(2 * self.k, 1024))
            return _kmeans_plusplus(xt if m == n else xt[_sample_rows(n, m, rng)], self.k, rng)
        cp = faiss.ClusteringParameters()  # faiss' own initialisation: a Clustering with no iteration
        cp.niter = 0
        cp.seed = seed
        cp.max_points_per_centroid = _NO_SUBSAMPLING  # xt is already the training set
        cp.min_points_per_centroid = 1  # small training sets are deliberate here: no warning
        cp.init_method = {"random": faiss.ClusteringInitMethod_RANDOM, "afkmc2": faiss.ClusteringInitMethod_AFK_MC2}[
            self.init
        ]
        clus = faiss.Clustering(d, self.k, cp)
        clus.train(xt, faiss.IndexFlatL2(d))
        return faiss.vector_to_array(clus.centroids).reshape(self.k, d).astype(np.float32)

    def _swap(self, state: _Labels, means: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, int, set[int]]:
        """One split/merge round from the last Lloyd iteration; returns (new centroids, swaps, clusters changed).

        `state` holds the exact labels and distances for the centroids before the update, `means`
        the update (counts: rows per cluster). Merge cost of cluster j into its nearest centroid j2
        (exact, assignments fixed): n_j n_j2 / (n_j + n_j2) * |m_j - m_j2|^2 (zero for an empty
        cluster). Split gain of cluster s: its SSE around m_s minus its SSE under a 2-means split.
        A swap merges j into j2 and reuses centroid j for one half of s; it is applied when
        gain > cost, so the objective on the training rows drops by gain - cost; each cluster
        takes part in one swap per round. The clusters with the largest SSE (a tenth of k, at
        least 8) are the split candidates.
        """
        k = self.k
        if k < 3:
            return means, 0, set()
        sizes = counts.astype(np.float64)
        moved = ((means.astype(np.float64) - state.cent) ** 2).sum(1)
        sse = np.maximum(np.bincount(state.lab, weights=state.dist**2, minlength=k) - sizes * moved, 0.0)
        total = float(sse.sum())
        if total <= 0:
            return means, 0, set()
        # nearest other centroid (2-NN among the centroids, skipping self; robust to duplicates)
        cdist, cnn = self._search(self.index_, means, means, nn=2)
        is_self = cnn[:, 0] == np.arange(k)
        other = np.where(is_self, cnn[:, 1], cnn[:, 0])
        odist = np.where(is_self, cdist[:, 1], cdist[:, 0]).astype(np.float64)
        pair = sizes + sizes[other]
        cost = np.divide(sizes * sizes[other], pair, out=np.zeros(k), where=pair > 0) * odist
        # split gains of the clusters with the largest SSE
        order = np.argsort(state.lab, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
        largest = np.argsort(-sse, kind="stable")[: min(k, max(8, int(k * _SPLIT_CANDIDATES)))]
        cand = [int(j) for j in largest if sizes[j] >= 2]
        if not cand:
            return means, 0, set()
        halves, split_sse = _two_means(state.x, [order[starts[j] : starts[j + 1]] for j in cand])
        splits = sorted(zip(sse[cand] - split_sse, cand, halves), key=lambda t: (-t[0], t[1]))
        merges = [(int(j), int(other[j])) for j in np.argsort(cost, kind="stable")]
        eps = 1e-7 * total
        used: set[int] = set()
        new = means.copy()
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
                new[j2] = (sizes[j] * means[j] + sizes[j2] * means[j2]) / pair[j]
            new[s], new[j] = halves[0], halves[1]
            used.update((s, j, j2))
            swaps += 1
        return new, swaps, used

    def _fit_once(self, xt: np.ndarray, seed: int):
        """Seed, then Lloyd iterations with split/merge rounds on the training rows `xt`.

        Every `refine_niter`-th update from the first on (up to `refine` of them, until a round
        finds no swap) also applies a split/merge round. Stops after `niter` iterations or once
        an iteration lowers the objective by at most `tol` of it. Returns (state, centroids, obj,
        nsplit, swaps): `state` holds the exact labels of `xt` for the centroids of the last
        iteration, `centroids` is that iteration's update.
        """
        rng = np.random.default_rng([seed, 1])  # empty-cluster splits
        state = _Labels(self, self.index_, xt, self._init_centroids(xt, seed))
        state.search(nn=2)
        obj: list[float] = []
        nsplit = swaps = rounds = 0
        while True:
            means, counts = _cluster_means(xt, state.lab, state.cent)
            obj.append(float(np.square(state.dist).sum()))
            if self.verbose:
                print(f"k-means iteration {len(obj)}: objective {obj[-1]:.6g}, {state.n_searched} rows searched")
            if len(obj) >= self.niter or (len(obj) > 1 and obj[-2] - obj[-1] <= self.tol * obj[-2]):
                nsplit += _split_empty(means, counts, set(), rng)
                return state, means, obj, nsplit, swaps
            used: set[int] = set()
            if rounds < self.refine and (len(obj) - 1) % self.refine_niter == 0:
                new, n_sw, used = self._swap(state, means, counts)
                rounds = rounds + 1 if n_sw else self.refine  # a round without swaps ends them
                means, swaps = new, swaps + n_sw
            nsplit += _split_empty(means, counts, used, rng)
            state.move(means)

    # -- labelling every row

    def _plan_labelling(self, train: _Labels, cent: np.ndarray, polish: int | str):
        """How to label every row: (projection for candidates or None, polish), judged on training rows.

        Both judged on up to 4096 training rows (a uniform subsample of the data), labelled for
        `cent` by one small 2-NN search:
        - polish="auto" becomes 0 when the bounds would surely leave too many rows unsure after
          the update: it moves centroid j by about its estimation error r_j / sqrt(n_j) (r_j: RMS
          distance of its n_j training rows), and a row keeps its label for free only if its
          second nearest centroid is farther than the nearest by more than about twice that.
          "Surely": over 3/4 of the rows fail, three times the budget, so that a polish the bounds
          can afford is not skipped here (the real check comes after the update);
        - a projection to dim = d/16, d/8 or d/4 principal directions is used when the expected
          cost per row, in flat searches, dim / d (projected search) + dim / k (projecting) + the
          fraction of rows Elkan's bound leaves unsure (searched in full), is below 0.8.
        """
        n, d = train.x.shape
        sample = _Labels(self, self.index_, np.ascontiguousarray(train.x[:: max(1, -(-n // 4096))]), cent)
        sample.search(nn=2)
        if polish == "auto":
            counts = np.bincount(train.lab, minlength=self.k).astype(np.float64)
            sse = np.bincount(train.lab, weights=train.dist**2, minlength=self.k)
            err = np.sqrt(np.divide(sse, counts**2, out=np.zeros(self.k), where=counts > 0))
            if np.mean(sample.lower - sample.dist < 2.0 * err[sample.lab]) > 3 * AUTO_POLISH_MAX_UNSURE:
                polish = 0
        dims = [dim for dim in (d // 16, d // 8, d // 4) if 8 <= dim < self.k] if self.k >= 16 else []
        # at best, the rows Elkan's bound settles for their true nearest centroid: too few, no projection
        if not dims or np.mean(2.0 * sample.dist + sample.margin() < sample.gaps()[sample.lab]) < 0.25:
            return None, polish
        axes = _principal_axes(cent, max(dims))
        best, best_cost = None, 0.8
        for dim in dims:
            proj = _Projection(self, axes, cent, dim)
            cost = dim / d + dim / self.k + 1.0 - float(np.mean(sample.candidates(sample.x, None, proj)[3]))
            if cost < best_cost:
                best, best_cost = proj, cost
        return best, polish

    def _label_all(self, x: np.ndarray, train: _Labels, cent: np.ndarray, polish: int | str):
        """Labels of every row, with `polish` Lloyd updates on all rows first.

        Returns (centroids, state with the labels, updates applied, projection dim used or None).
        """
        plan, polish = self._plan_labelling(train, cent, polish)
        state = _Labels(self, self.index_, x, cent)
        state.search(nn=1 if polish == 0 else 2, plan=plan)
        updates = 0
        for _ in range(1 if polish == "auto" else int(polish)):
            new, _counts = _cluster_means(x, state.lab, state.cent)
            budget = AUTO_POLISH_MAX_UNSURE * len(x) if polish == "auto" else None
            if state.move(new, budget) is None:
                break  # keep the trained centroids and the exact labels already found
            updates += 1
        return state.cent, state, updates, None if plan is None else plan.axes

    # -- public API

    def fit(self, x: np.ndarray) -> KMeans:
        """Learn `k` centroids from `x` (n, d) float32, then label every row of `x`."""
        x = _as_f32(x)
        n, d = x.shape
        if n < self.k:
            raise ValueError(f"k-means needs at least k={self.k} rows, got {n}")
        self.gpu_ = self._want_gpu()
        self.index_ = self._new_index(d)
        self._rows_searched = 0
        try:
            n_train = max(self.k, min(n, self.k * self.max_points_per_centroid, self.sample_size or n))
            xt = x if n_train == n else x[_sample_rows(n, n_train, np.random.default_rng(self.seed))]
            best = None
            for r in range(self.nredo):
                run = self._fit_once(xt, self.seed + r)
                if best is None or run[2][-1] < best[2][-1]:
                    best = run
            train, centroids, obj, self.n_split_, self.n_swaps_ = best
            self.obj_ = np.asarray(obj, dtype=np.float64)
            self.n_train_ = n_train
            if n_train == n:  # the training rows are all rows: their labels follow the last update cheaply
                train.move(centroids)
                state, self.n_polish_, axes = train, 0, None
            else:
                centroids, state, self.n_polish_, axes = self._label_all(x, train, centroids, self.polish)
        finally:
            del self.index_
        self.n_searched_ = self._rows_searched
        self.centroids_ = np.ascontiguousarray(centroids, dtype=np.float32)
        # predict() takes its candidates as the labelling pass did, in the same principal directions
        # (of the centroids before the polish: a guess either way); plain arrays, so the model pickles
        self._predict_axes = axes
        self.labels_ = state.lab
        self.inertia_ = float(np.square(state.dist).sum())
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

    def predict_stream(self, chunks: Iterable[np.ndarray], return_distances: bool = False):
        """`predict` over an iterable of (n_i, d) arrays, one chunk in memory at a time.

        For features stored in shards: only the labels (8 bytes a row) are kept, and with
        `return_distances` each row's squared distance to its centroid (float32), as (labels, sq).
        """
        self._check_fitted()
        cent = self.centroids_
        index = self._new_index(cent.shape[1])
        axes = getattr(self, "_predict_axes", None)
        plan = gaps = None
        if axes is not None:  # candidates from a projected search, kept where Elkan's bound proves them
            plan = _Projection(self, axes, cent, len(axes[0]))
            gaps = _centroid_gaps(self, index, cent)
        self._rows_searched = 0
        out, sq = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.float32)]
        for chunk in chunks:
            chunk = _as_f32(chunk)
            if len(chunk):
                labels = _Labels(self, index, chunk, cent, gaps)
                labels.search(nn=1, plan=plan)
                out.append(labels.lab)
                if return_distances:
                    sq.append(np.square(labels.dist).astype(np.float32))
        return (np.concatenate(out), np.concatenate(sq)) if return_distances else np.concatenate(out)

    def fit_predict(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).labels_


# ----------------------------------------------------------------------------- scores


def clustering_score(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """The seed article's score: minus the mean squared distance of each row to its centre."""
    x = np.asarray(x, dtype=np.float64)
    diff = x - np.asarray(centroids, dtype=np.float64)[np.asarray(labels)]
    return -float(np.einsum("ij,ij->i", diff, diff).mean())


def sq_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared distance of each row to its own centroid, float32, without an (n, d) temporary."""
    return _sq_dist_by_idx(x, centroids, labels)


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
