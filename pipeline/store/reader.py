"""Reading a store: open by path or URL, list clips, read one clip's features (any channel prefix)
and latents. Imports only numpy, zarr and fsspec: the trainer reads through this module.

Example:
    store = Store("runs/demo/store.zarr")          # or "s3://bucket/store.zarr", "file:///..."
    clip = store.read_clip(0, channels=256)        # clip.features [7, 32, 56, 256] float16
    clip.latents.shape                             # (16, 7, 54, 96)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .basis import PCABasis
from .format import StoreError, check_compatible, check_manifest
from .geometry import Geometry
from .location import filesystem, open_group


@dataclass
class ClipArrays:
    clip_id: str
    features: np.ndarray  # [7, H, W, c] float16: PCA features of frames 0, 4, ..., 24
    latents: np.ndarray  # [16, 7, h, w] float16: normalized VAE posterior means
    meta: dict = field(default_factory=dict)  # scene, start, timestamps, variant
    pred_features: np.ndarray | None = None  # [3, H, W, c] float16: Stage 1 rollouts of latents 4-6


class Store:
    """A finished store. Clips are numbered 0..len-1 over valid clips; each has `num_variants` rows."""

    def __init__(self, location: str, storage_options: dict | None = None, allow_incomplete: bool = False):
        self.location = str(location)
        self.storage_options = storage_options
        try:
            self.group = open_group(self.location, mode="r", storage_options=storage_options)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            from .format import NotAStoreError
            raise NotAStoreError(f"{self.location} is not a re2pix store: no Zarr v3 group there ({e})") from e
        self.manifest = dict(self.group.attrs)
        check_manifest(self.manifest, self.location, allow_incomplete=allow_incomplete)
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        self.variants: list[str] = list(self.manifest["variants"])
        self._features = self.group["frames/features"]
        self._latents = self.group["clips/latents"]
        valid = self.group["clips/valid"][...]
        v = self.num_variants
        self._clip_rows = np.flatnonzero(valid.reshape(-1, v).all(axis=1)) * v  # first row of each clip
        self._feature_rows = self.group["clips/feature_rows"][...]

    def __len__(self) -> int:
        return len(self._clip_rows)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Store({self.location!r}, dataset={m.get('dataset')!r}, split={m.get('split')!r}, "
                f"clips={len(self)}, variants={self.variants}, pca={self.pca_fingerprint[:12]})")

    @property
    def num_variants(self) -> int:
        return len(self.variants)

    @property
    def num_channels(self) -> int:
        return self.geometry.num_pca_channels

    @property
    def pca_fingerprint(self) -> str:
        return self.manifest["pca"]["fingerprint"]

    @cached_property
    def clip_ids(self) -> list[str]:
        return [str(self.clip_table["id"][r]) for r in self._clip_rows]

    @cached_property
    def basis(self) -> PCABasis:
        return PCABasis.load(self.group["pca"])

    @property
    def has_pred_features(self) -> bool:
        return "pred_features" in self.group["clips"] and bool(
            self.group["clips/pred_features"].attrs.get("complete", False))

    @property
    def pred_features_fingerprint(self) -> str | None:
        if "pred_features" not in self.group["clips"]:
            return None
        return self.group["clips/pred_features"].attrs.get("checkpoint_fingerprint")

    def row(self, i: int, variant: int = 0) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"clip {i} out of range for {self.location} ({len(self)} clips)")
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} out of range ({self.variants})")
        return int(self._clip_rows[i]) + variant

    def _channels(self, channels: int | None) -> int:
        c = self.num_channels if channels is None else int(channels)
        if not 0 < c <= self.num_channels:
            raise ValueError(f"channels must be in 1..{self.num_channels}, got {channels}")
        return c

    def read_features(self, i: int, channels: int | None = None, variant: int = 0,
                      out: np.ndarray | None = None, frames: slice | None = None) -> np.ndarray:
        """[7, H, W, c] float16: the first c PCA channels of the clip's 7 feature frames (`frames`: only
        those of a slice of them). `out`: a C-contiguous array of that shape to decode into (a slot of a
        batch buffer), returned."""
        rows = self._feature_rows[self.row(i, variant)]
        if frames is not None:
            rows = rows[frames]
        c = self._channels(channels)
        # basic slices only: an integer-array selection makes zarr's sharding codec index every
        # element (about 15x slower). A clip's rows are usually evenly spaced: one strided slice.
        step = rows[1] - rows[0] if len(rows) > 1 else 1
        if step > 0 and np.all(np.diff(rows) == step):
            return _read(self._features, (slice(rows[0], rows[-1] + 1, step), slice(None), slice(None), slice(c)), out)
        if out is None:
            return np.stack([self._features[r, :, :, :c] for r in rows])
        for k, r in enumerate(rows):
            _read(self._features, (int(r), slice(None), slice(None), slice(c)), out[k])
        return out

    def read_latents(self, i: int, variant: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """[16, 7, h, w] float16 (`out`: as in read_features)."""
        return _read(self._latents, (self.row(i, variant),), out)

    def read_pred_features(self, i: int, channels: int | None = None, variant: int = 0,
                           out: np.ndarray | None = None) -> np.ndarray:
        """[3, H, W, c] float16: Stage 1's rollout for latents 4-6 (written by the rollout job)."""
        if not self.has_pred_features:
            raise StoreError(f"{self.location} has no finished clips/pred_features: run the rollout job first "
                             "(make rollout)")
        selection = (self.row(i, variant), Ellipsis, slice(self._channels(channels)))
        return _read(self.group["clips/pred_features"], selection, out)

    @cached_property
    def clip_table(self) -> dict[str, np.ndarray]:
        """Per-row clip metadata (id, scene, start, timestamps), read once: rows, not clip numbers."""
        c = self.group["clips"]
        return {k: c[k][...] for k in ("id", "scene", "start", "timestamps")}

    def clip_meta(self, i: int, variant: int = 0) -> dict:
        r, t = self.row(i, variant), self.clip_table
        return {"clip_id": str(t["id"][r]), "scene": str(t["scene"][r]), "start": int(t["start"][r]),
                "timestamps": t["timestamps"][r].tolist(), "variant": self.variants[variant]}

    def read_clip(self, i: int, channels: int | None = None, variant: int = 0,
                  with_pred: bool = False) -> ClipArrays:
        meta = self.clip_meta(i, variant)
        return ClipArrays(meta["clip_id"], self.read_features(i, channels, variant), self.read_latents(i, variant),
                          meta, self.read_pred_features(i, channels, variant) if with_pred else None)

    def failures(self) -> list[dict]:
        if "failures" not in self.group:
            return []
        fg = self.group["failures"]
        cols = {k: fg[k][...] for k in ("clip_id", "file", "reason")}
        return [{k: str(cols[k][j]) for k in cols} for j in range(len(cols["clip_id"]))]

    def unit_records(self) -> list[dict]:
        fs, root = filesystem(self.location, self.storage_options)
        return [json.loads(fs.cat_file(p)) for p in sorted(fs.glob(f"{root}/progress/*.json"))]

    def verify(self) -> list[str]:
        """Re-hash every row against the digests its work unit recorded; returns the mismatches."""
        from .writer import digest  # writer pulls in the clip index; only verification needs it
        bad = []
        for rec in self.unit_records():
            for key, want in rec["digests"].items():
                kind, row = key.split("/")
                arr = self._features[int(row)] if kind == "features" else self._latents[int(row)]
                if digest(arr) != want:
                    bad.append(f"{kind} row {row} (unit {rec['unit']})")
        return bad


def _read(array, selection: tuple, out: np.ndarray | None) -> np.ndarray:
    """A basic selection of a Zarr array, decoded into `out` when given (no copy of the result)."""
    if out is None:
        return array[selection]
    from zarr.core.buffer.cpu import NDBuffer
    array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
    return out


def open_stores(locations: list[str], storage_options: dict | None = None) -> list[Store]:
    """Open several stores for one training run, refusing mixed feature spaces or geometries."""
    stores = [Store(loc, storage_options) for loc in locations]
    check_compatible([s.manifest for s in stores], [s.location for s in stores])
    return stores
