"""DeepCluster: feature store, k-means stage, the loop."""
