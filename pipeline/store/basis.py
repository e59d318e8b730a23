"""The PCA basis: per-dimension standardization followed by a projection to the top components.

Its fingerprint (a sha256 of the arrays) is what makes two stores compatible: features projected
with different bases live in different spaces and must never be mixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

BASIS_ARRAYS = ("mean", "std", "components", "explained_variance")


@dataclass(frozen=True)
class PCABasis:
    mean: np.ndarray  # [D] float32, per-dimension mean of the raw features
    std: np.ndarray  # [D] float32, per-dimension standard deviation
    components: np.ndarray  # [C, D] float32, rows ordered by explained variance, largest first
    explained_variance: np.ndarray  # [C] float32

    def __post_init__(self):
        d = self.mean.shape[0]
        if self.std.shape != (d,) or self.components.ndim != 2 or self.components.shape[1] != d:
            raise ValueError(
                f"inconsistent basis shapes: mean {self.mean.shape}, std {self.std.shape}, "
                f"components {self.components.shape}"
            )
        if self.explained_variance.shape != (self.components.shape[0],):
            raise ValueError("explained_variance must have one value per component")
        if not np.all(self.std > 0):
            raise ValueError("std must be positive")

    @property
    def num_components(self) -> int:
        return self.components.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.components.shape[1]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in BASIS_ARRAYS:
            a = np.ascontiguousarray(getattr(self, name), dtype="<f4")
            h.update(f"{name}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def prefix(self, channels: int) -> PCABasis:
        """The basis of the first `channels` components (what a `copy --channels` store holds)."""
        if not 0 < channels <= self.num_components:
            raise ValueError(f"a prefix of {channels} components of a {self.num_components}-component basis")
        return PCABasis(self.mean, self.std, self.components[:channels], self.explained_variance[:channels])

    def project(self, x: np.ndarray, channels: int | None = None) -> np.ndarray:
        """[..., D] raw features -> [..., C] PCA features (float32)."""
        comps = self.components if channels is None else self.components[:channels]
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ comps.T

    def unproject(self, y: np.ndarray) -> np.ndarray:
        """[..., c] PCA features (any prefix c) -> [..., D] raw features (the best rank-c estimate)."""
        y = np.asarray(y, np.float32)
        return (y @ self.components[: y.shape[-1]]) * self.std + self.mean

    def save(self, group, codecs: tuple | None = None) -> None:
        """Write the arrays into a zarr group (e.g. a store's `pca/`, or a standalone basis store), with the
        store's codecs (default zstd), always followed by a crc32c checksum: a changed byte fails the read."""
        for name in BASIS_ARRAYS:
            a = np.asarray(getattr(self, name), np.float32)
            group.create_array(
                name,
                shape=a.shape,
                dtype="float32",
                overwrite=True,
                compressors=codecs or (ZstdCodec(level=3), Crc32cCodec()),
            )[...] = a
        group.attrs.update(
            {"fingerprint": self.fingerprint, "num_components": self.num_components, "feature_dim": self.feature_dim}
        )

    @classmethod
    def load(cls, group) -> PCABasis:
        missing = [n for n in BASIS_ARRAYS if n not in group]
        if missing:
            raise ValueError(f"PCA basis at {group.store_path} lacks arrays {missing}")
        basis = cls(**{n: np.asarray(group[n][...], np.float32) for n in BASIS_ARRAYS})
        recorded = group.attrs.get("fingerprint")
        if recorded is not None and recorded != basis.fingerprint:
            raise ValueError(
                f"PCA basis at {group.store_path} is corrupt: its arrays hash to "
                f"{basis.fingerprint[:12]}, its attributes say {recorded[:12]}"
            )
        return basis
