"""Benchmarks (`make bench`): figures, not tests. Not installed with re2pix (pyproject.toml packages only
pipeline, model, inference and jobs): run them from a checkout's root, `python -m benchmarks.bench ...`."""
