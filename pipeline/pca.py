"""Streaming, exact, mergeable PCA of DINOv2 features (per-dimension standardization, then PCA).

Each accumulator holds float64 moments of everything it has seen: the count, the mean and the
centered scatter matrix M2 = sum (x - mean)(x - mean)^T. Batches and accumulators combine with
Chan et al.'s pairwise update, which is exact (no sampling, no sketching) and, unlike raw
sums of outer products, does not cancel catastrophically when a dimension's mean dwarfs its spread.
Results depend on the order of updates only through float64 rounding: feed batches in a fixed order
when the basis fingerprint must be reproducible.

Conventions (all population statistics, ddof = 0):
  std = sqrt(M2_dd / n); a dimension with std <= STD_EPS is constant and gets std = 1, as
  sklearn's StandardScaler does, so it standardizes to ~0 instead of blowing up;
  covariance of standardized data = M2 / n / (std std^T); components = its top eigenvectors,
  largest eigenvalue first, each signed so its largest-|.| entry is positive;
  explained_variance = the eigenvalues (variance of each PCA channel on the fitting data).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.store.basis import PCABasis

STD_EPS = 1e-6


class PCAAccumulator:
    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim, np.float64)  # [D]
        self.m2 = np.zeros((self.dim, self.dim), np.float64)  # [D, D] centered scatter

    @classmethod
    def from_moments(cls, count: int, mean, m2) -> PCAAccumulator:
        """An accumulator holding moments computed elsewhere (e.g. on a GPU worker)."""
        acc = cls(len(mean))
        acc.count, acc.mean, acc.m2 = int(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        return acc

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self.count, self.count + n_b
        if n_b == 0:
            return
        delta = mean_b - self.mean
        self.m2 += m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n

    def update(self, x) -> PCAAccumulator:
        """Add features [..., D] (any leading shape, e.g. [B, h, w, D])."""
        x = np.array(x, np.float64).reshape(-1, self.dim)  # our own copy: centered in place
        if len(x):
            mean_b = x.mean(axis=0)
            x -= mean_b
            self._combine(len(x), mean_b, x.T @ x)
        return self

    def merge(self, other: PCAAccumulator) -> PCAAccumulator:
        """Add everything `other` has seen (e.g. from another worker)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dim {self.dim} and {other.dim}")
        self._combine(other.count, other.mean, other.m2)
        return self

    def std(self) -> np.ndarray:
        """[D] population std; constant dimensions (std <= STD_EPS) get 1."""
        std = np.sqrt(np.maximum(np.diag(self.m2) / self.count, 0.0))
        return np.where(std > STD_EPS, std, 1.0)

    def to_basis(self, num_components: int) -> PCABasis:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors to fit a PCA, have {self.count}")
        if not 0 < num_components <= self.dim:
            raise ValueError(f"num_components must be in 1..{self.dim}, got {num_components}")
        std = self.std()
        cov = self.m2 / self.count / np.outer(std, std)  # covariance of the standardized features
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigval)[::-1][:num_components]
        components = eigvec[:, order].T  # [C, D]
        rows = np.arange(num_components)
        components *= np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
        return PCABasis(
            mean=self.mean.astype(np.float32),
            std=std.astype(np.float32),
            components=components.astype(np.float32),
            explained_variance=np.maximum(eigval[order], 0.0).astype(np.float32),
        )


def fit_pca(feature_batches: Iterable, num_components: int) -> PCABasis:
    """Fit a basis from an iterable of feature arrays [..., D] (streamed, one batch in memory at a time).
    The jobs feed a PCAAccumulator themselves; this is the one-call form for users fitting their own features."""
    acc = None
    for x in feature_batches:
        x = np.asarray(x)
        if acc is None:
            acc = PCAAccumulator(x.shape[-1])
        acc.update(x)
    if acc is None:
        raise ValueError("no features to fit a PCA on")
    return acc.to_basis(num_components)


def _local_or_url(url: str) -> str:
    return url.removeprefix("file://")


def save_basis(basis: PCABasis, url: str, overwrite: bool = False, storage_options: dict | None = None) -> None:
    """Write a standalone basis (a Zarr v3 group) to a path or fsspec URL."""
    from pipeline.store.location import open_group

    target = _local_or_url(str(url))
    if "://" not in target:  # zarr 3.1's FsspecStore does not create local folders
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    group = open_group(target, mode="w" if overwrite else "w-", storage_options=storage_options)
    group.attrs.update({"format": "re2pix-pca-basis", "version": 1})
    basis.save(group)


def load_basis(url: str, storage_options: dict | None = None) -> PCABasis:
    """Read a basis from a standalone basis group, or from a store's `pca/` group, at a path or URL."""
    from pipeline.store.location import open_group

    group = open_group(str(url), mode="r", storage_options=storage_options)
    if "pca" in group and "mean" not in group:
        group = group["pca"]
    return PCABasis.load(group)
