"""Command-line entry points: cache, pca, train, rollout, predict, evaluate, store tools."""
