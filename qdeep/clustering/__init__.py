"""Clustering algorithms on arrays, no Ray: PCA-whitening + faiss k-means (kmeans), the DeepCluster
step (deepcluster), the sharded feature store (store; one shard file: shards)."""
