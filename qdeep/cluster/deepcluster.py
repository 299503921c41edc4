"""The DeepCluster step as plain functions on arrays (Caron et al. 2018): descriptors ->
PCA-whitening + L2 -> k-means -> pseudo-labels, and the two ways of training on unbalanced
clusters (balanced class weights, or the reference code's uniform per-cluster sampler).

The iteration loop (features store -> these -> Ray Train on pseudo-labels) builds on these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qdeep.cluster.kmeans import KMeans, clustering_score, cluster_sizes, imbalance_factor, preprocess_features
from qdeep.parts.targets import balanced_class_weights
from qdeep.train.data import uniform_class_sample as uniform_cluster_sample

__all__ = ["Clustering", "balanced_class_weights", "pseudo_labels", "uniform_cluster_sample"]


@dataclass
class Clustering:
    labels: np.ndarray  # (n,) pseudo-label of every image
    centroids: np.ndarray  # (k, d) in the whitened space
    score: float  # the seed article's clustering score (negative mean squared distance to the centre)
    sizes: np.ndarray  # (k,)
    imbalance: float
    n_empty: int
    distances: np.ndarray  # (n,) squared distance of each image to its centre (whitened space)


def pseudo_labels(features: np.ndarray, k: int, pca_dim: int | None = None, seed: int = 0) -> Clustering:
    """Cluster descriptors into k pseudo-classes, as the reference's `Kmeans.cluster` does."""
    x, _ = preprocess_features(features, pca_dim)
    km = KMeans(k, seed=seed).fit(x)
    sizes = cluster_sizes(km.labels_, k)
    distances = ((x - km.centroids_[km.labels_]) ** 2).sum(1)
    return Clustering(labels=km.labels_, centroids=km.centroids_, score=clustering_score(x, km.labels_, km.centroids_),
                      sizes=sizes, imbalance=imbalance_factor(sizes), n_empty=int((sizes == 0).sum()),
                      distances=distances)
