"""Store format v1: a self-describing Zarr v3 group of PCA features and VAE latents.

Only numpy, zarr and fsspec are imported here: the trainer reads stores through this package and
must stay free of heavy imports.
"""
