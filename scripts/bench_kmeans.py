"""Benchmark: qdeep's k-means stage vs scikit-learn MiniBatchKMeans (the seed article's choice).

Same float32 data, same process, one run; every method is scored by the same function (exact
inertia of the nearest-centroid assignment, NMI against the true blob ids, faiss' imbalance
factor). Goal: qdeep at most 1/3 of MiniBatchKMeans' wall time at no more than 1.01x its inertia.
Times are the best of `--repeats` runs, the two methods alternating (the machine is shared: the
least disturbed run is the signal).

Data: sklearn `make_blobs(n, d, centers=k, cluster_std=1, center_box=(-B, B), random_state=0)`:
k Gaussian blobs of about n/k rows, unit variance per dimension, centres uniform in [-B, B]^d.
Two data sets by default (`--box 10 1`):
  B=10 (make_blobs' default): well separated (centres ~130 apart, blob radius ~16);
  B=1: centres ~13 apart, blobs overlap heavily (cluster std comparable to the spread).
The "truth" row scores the true blob means.

Why faiss' defaults lose: random init (faiss' default, the reference's) leaves ~1/e of the blobs
without a centroid and Lloyd cannot move a centroid across the empty space between blobs; faiss'
plain k-means++ / AFK-MC2 still miss blobs in their last draws; more iterations, nredo or more
rows do not help, it is a seeding problem. What closed the gap (qdeep's defaults):
  1. split/merge rounds after Lloyd: split a cluster that straddles two blobs, merge a centroid
     into its nearest neighbour, when the split gains more than the merge costs; then 3 Lloyd
     iterations. Alone it takes random init from 7.4x to 1.05x the truth on B=10, and it halves
     the imbalance on B=1;
  2. greedy k-means++ seeding (2 + ln k candidates a draw, sklearn's variant) on 2k rows;
  3. Lloyd on only 16 rows per centroid (seeded subsample), stopping once an iteration gains
     < 0.3%, then one Lloyd update on all rows ("polish") when Hamerly's bound settles >= 75% of
     the relabelling (separated data: nearly free; B=10 goes from 1.06x to 1.000x the truth).

Measured here (2 cores shared with other jobs; faiss 1.15.1, sklearn 1.9), N=200,000, d=256,
k=1000; quietest run (best of 2):
                              B=10: time  inertia  NMI   imbal.  |  B=1: time  inertia  NMI   imbal.
  truth (blob means)                 -    50.9M   1.000  1.00    |        -    50.9M   1.000  1.00
  qdeep KMeans (defaults)         1.98 s  50.9M   1.000  1.00    |     2.64 s  55.7M   0.955  1.47
  sklearn MiniBatchKMeans         5.72 s  611M    0.894  27.1    |     7.21 s  64.3M   0.387  31.1
  ratios qdeep/MBK: B=10 time 0.35, inertia 0.083; B=1 time 0.37, inertia 0.87.
Other runs: MiniBatchKMeans took 3.8-7 s when the machine was quiet (it stops after ~1.5 epochs;
the 9.9 s first recorded for it was a loaded machine), so the time ratio moved between 0.35 and
0.45; single-threaded (`--threads 1`): 3.1 s vs 5.4 s (0.58) and 3.4 s vs 7.1 s (0.47). So the
inertia goal is met by far (and NMI/imbalance much better), the 1/3 time goal is NOT reliably
met: qdeep needs one full labelling pass (~0.6 s on 2 cores, GEMM-bound) plus ~1-1.4 s of
seeding, Lloyd on the subsample and split/merge. max_points_per_centroid=10 is ~25% faster but
drops NMI on B=1 to 0.82.
Ablation (`--ablation`, inertia / truth, NMI, imbalance; B=10 | B=1):
  faiss defaults (random, 20 it)      6.67 0.969 1.51 | 1.054 0.967 1.53
  qdeep init=random refine=0          7.42 0.970 1.64 | 1.161 0.808 3.53
  qdeep init=random                   1.05 1.000 1.01 | 1.110 0.929 1.69
  qdeep init=afkmc2 refine=0          2.62 0.992 1.13 | 1.157 0.817 3.44
  qdeep kmeans++ refine=0             4.10 0.985 1.26 | 1.141 0.853 2.71
  qdeep polish=0                      1.06 1.000 1.00 | 1.094 0.955 1.47
  qdeep polish=1                      1.00 1.000 1.00 | 1.028 0.977 1.28
  qdeep max_points_per_centroid=10    1.00 1.000 1.00 | 1.182 0.824 2.35
  qdeep max_points_per_centroid=64    1.09 1.000 1.01 | 1.024 0.991 1.14
  qdeep max_points_per_centroid=256   1.00 1.000 1.00 | 1.005 0.997 1.03
(`--ablation` adds several minutes at the default size; `--small` is N=50,000, k=250.)

Usage: python scripts/bench_kmeans.py [--small] [--n N] [--d D] [--k K] [--box B ...]
                                      [--repeats R] [--threads T] [--ablation]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.datasets import make_blobs

from qdeep.cluster.kmeans import KMeans, cluster_sizes, imbalance_factor, nmi


def score(x: np.ndarray, y: np.ndarray, centroids: np.ndarray) -> tuple[float, float, float]:
    """(inertia, NMI vs the blob ids, imbalance factor) of the nearest-centroid assignment.

    One function for every method: inertia is the exact sum of squared distances of every row
    to its nearest centroid.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    nearest = index.search(x, 1)[1][:, 0]
    inert = 0.0
    for i in range(0, len(x), 8192):
        diff = x[i : i + 8192] - centroids[nearest[i : i + 8192]]
        inert += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return inert, nmi(nearest, y), imbalance_factor(cluster_sizes(nearest, len(centroids)))


def blob_means(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The true blob means (their nearest-centroid assignment is the "truth" row)."""
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, y, x)
    return (sums / np.maximum(np.bincount(y, minlength=k), 1)[:, None]).astype(np.float32)


def timed(fn):
    """(result, wall time in seconds) of one call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def faiss_defaults(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """faiss.Kmeans as the reference uses it: random init, 20 iterations (faiss' 256/centroid cap)."""
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed + 1234)
    km.train(x)
    return km.centroids


def run(n: int, d: int, k: int, box: float, seed: int, repeats: int, ablation: bool) -> tuple[float, float]:
    x, y = make_blobs(n_samples=n, n_features=d, centers=k, center_box=(-box, box), random_state=seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    print(f"\n== N={n} d={d} k={k}, make_blobs std 1, centres in [-{box:g}, {box:g}]^d")
    rows = [("truth (blob means)", float("nan"), *score(x, y, blob_means(x, y, k)))]

    t_q, t_m = float("inf"), float("inf")
    for _ in range(repeats):  # alternate, so both see the same machine
        km, t = timed(lambda: KMeans(k, seed=seed).fit(x))
        t_q = min(t_q, t)
        mbk, t = timed(lambda: MiniBatchKMeans(n_clusters=k, random_state=seed).fit(x))
        t_m = min(t_m, t)
    rows.append(("qdeep KMeans (defaults)", t_q, *score(x, y, km.centroids_)))
    rows.append(("sklearn MiniBatchKMeans", t_m, *score(x, y, mbk.cluster_centers_)))

    if ablation:
        variants = {
            "faiss defaults (random, 20 it)": lambda: faiss_defaults(x, k, seed),
            "qdeep init=random refine=0": dict(init="random", refine=0),
            "qdeep init=random": dict(init="random"),
            "qdeep init=afkmc2 refine=0": dict(init="afkmc2", refine=0),
            "qdeep kmeans++ refine=0": dict(refine=0),
            "qdeep kmeans++ refine=0 polish=0": dict(refine=0, polish=0),
            "qdeep polish=0": dict(polish=0),
            "qdeep polish=1": dict(polish=1),
            "qdeep max_points_per_centroid=10": dict(max_points_per_centroid=10),
            "qdeep max_points_per_centroid=64": dict(max_points_per_centroid=64),
            "qdeep max_points_per_centroid=256": dict(max_points_per_centroid=256),
        }
        for name, spec in variants.items():
            if callable(spec):
                cent, t = timed(spec)
            else:
                model, t = timed(lambda spec=spec: KMeans(k, seed=seed, **spec).fit(x))
                cent = model.centroids_
            rows.append((name, t, *score(x, y, cent)))

    print(f"{'method':36s} {'time s':>7s} {'inertia':>10s} {'/truth':>7s} {'NMI':>6s} {'imbal.':>7s}")
    for name, t, inert, nmi_, imb in rows:
        print(f"{name:36s} {t:7.2f} {inert:10.4g} {inert / rows[0][2]:7.3f} {nmi_:6.3f} {imb:7.3f}")
    print(f"qdeep: {km.n_train_} training rows, {len(km.obj_)} Lloyd iterations on them, {km.n_swaps_} "
          f"split/merge swaps, {km.n_empty_} empty clusters, imbalance {km.imbalance_factor_:.3f}")
    time_ratio, inertia_ratio = t_q / t_m, rows[1][2] / rows[2][2]
    time_ok = "OK" if time_ratio <= 1 / 3 else "MISSED"
    inertia_ok = "OK" if inertia_ratio <= 1.01 else "MISSED"
    print(f"time ratio    qdeep/MiniBatchKMeans {time_ratio:6.3f}  (goal <= 0.333) {time_ok}")
    print(f"inertia ratio qdeep/MiniBatchKMeans {inertia_ratio:6.3f}  (goal <= 1.01)  {inertia_ok}")
    return time_ratio, inertia_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="quick check: N=50,000, k=250")
    parser.add_argument("--n", type=int, default=None, help="rows (default 200,000; 50,000 with --small)")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=None, help="clusters (default 1000; 250 with --small)")
    parser.add_argument("--box", type=float, nargs="+", default=[10.0, 1.0], help="centre box half-widths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method (best kept)")
    parser.add_argument("--ablation", action="store_true", help="also time faiss defaults and qdeep variants")
    parser.add_argument("--threads", type=int, default=None, help="limit faiss/BLAS/OpenMP threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    n = args.n or (50_000 if args.small else 200_000)
    k = args.k or (250 if args.small else 1000)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    for box in args.box:
        run(n, args.d, k, box, args.seed, args.repeats, args.ablation)


if __name__ == "__main__":
    main()
