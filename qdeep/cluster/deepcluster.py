"""The DeepCluster step as plain functions on arrays (Caron et al. 2018): descriptors ->
PCA-whitening + L2 -> k-means -> pseudo-labels, and the two ways of training on unbalanced
clusters (balanced class weights, or the reference code's uniform per-cluster sampler).

The iteration loop (features store -> these -> Ray Train on pseudo-labels) builds on these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from qdeep.cluster.kmeans import KMeans, clustering_score, cluster_sizes, imbalance_factor, preprocess_features


@dataclass
class Clustering:
    labels: np.ndarray  # (n,) pseudo-label of every image
    centroids: np.ndarray  # (k, d) in the whitened space
    score: float  # the seed article's clustering score (negative mean squared distance to the centre)
    sizes: np.ndarray  # (k,)
    imbalance: float
    n_empty: int


def pseudo_labels(features: np.ndarray, k: int, pca_dim: int | None = None, seed: int = 0) -> Clustering:
    """Cluster descriptors into k pseudo-classes, as the reference's `Kmeans.cluster` does."""
    x, _ = preprocess_features(features, pca_dim)
    km = KMeans(k, seed=seed).fit(x)
    sizes = cluster_sizes(km.labels_, k)
    return Clustering(labels=km.labels_, centroids=km.centroids_, score=clustering_score(x, km.labels_, km.centroids_),
                      sizes=sizes, imbalance=imbalance_factor(sizes), n_empty=int((sizes == 0).sum()))


def balanced_class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster loss weights inversely proportional to size (the seed article's choice);
    empty clusters get weight 0, since no image carries them."""
    weights = np.zeros(k, dtype=np.float32)
    present = np.unique(labels)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def uniform_cluster_sample(labels: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices for one epoch of the reference code's UnifLabelSampler: about n / (non-empty
    clusters) images from each cluster, drawn with replacement only where a cluster is too small,
    then shuffled. It keeps a few huge clusters from dominating the epoch."""
    rng = np.random.default_rng(seed)
    n = len(labels) if n is None else n
    clusters = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per = int(n // len(clusters)) + 1
    picks = [rng.choice(members, per, replace=len(members) < per) for members in clusters]
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out[:n]
