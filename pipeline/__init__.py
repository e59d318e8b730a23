"""The cache pipeline: sources -> clip index -> encoders -> PCA -> store."""

__version__ = "0.1.0"
