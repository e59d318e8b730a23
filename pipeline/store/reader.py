"""Reading a store: open by path or URL, list clips, read one clip's features (any channel prefix)
and latents. Imports only numpy, zarr and fsspec: the trainer reads through this module.

Example:
    store = Store("runs/demo/store.zarr")          # or "s3://bucket/store.zarr", "file:///..."
    clip = store.read_clip(0, channels=256)        # clip.features [7, 32, 56, 256] float16
    clip.latents.shape                             # (16, 7, 54, 96)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import zarr

from .basis import PCABasis
from .direct import NONFINITE, ChunkDamage, DirectArray, finite
from .format import (
    DECODE_ERRORS,  # also imported from here (copy.py)
    PSEUDO_DEPTH,
    DamagedStoreError,
    IncompatibleStoresError,
    IncompleteStoreError,
    NotAStoreError,
    StoreError,
    check_compatible,
    check_manifest,
    decode_reason,
    decode_strings,
    geometry_of,
    pseudo_depth_hw,
)
from .location import filesystem, is_url, open_group
from .lock import live_holder
from .lossy import SCALES, dequantize_int8, parse_compression

_SHAPED = ("frames/features", "clips/latents", "clips/valid", "clips/feature_rows")
_MAX_ROWS = 1 << 27  # clips or frames in one store: far above any dataset, far below an absurd allocation


def _int_in(x, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


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
            from .chunk_cache import cached_store  # RE2PIX_CHUNK_CACHE: keep remote chunks in a local folder

            cached = cached_store(self.location, storage_options)
            self.group = (
                zarr.open_group(cached, mode="r", zarr_format=3, use_consolidated=False)
                if cached is not None
                else open_group(self.location, mode="r", storage_options=storage_options)
            )
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            raise NotAStoreError(f"{self.location} is not a re2pix store: no Zarr v3 group there ({e})") from e
        self.manifest = dict(self.group.attrs)
        try:
            check_manifest(self.manifest, self.location, allow_incomplete=allow_incomplete)
        except IncompleteStoreError:
            if holder := live_holder(self.location, storage_options):  # not stopped early: still being written
                raise IncompleteStoreError(f"{self.location} is being written by {holder}; wait for it") from None
            raise
        self.geometry = geometry_of(self.manifest, self.location)
        self.variants: list[str] = list(self.manifest["variants"])
        try:
            arrays = {name: self.group[name] for name in _SHAPED}
        except KeyError as e:
            raise DamagedStoreError(self.location, str(e).strip("'\""), None, "the array is missing") from e
        self._check_shapes(arrays)  # metadata only: nothing is read or allocated before the shapes are right
        self._features, self._latents = arrays["frames/features"], arrays["clips/latents"]
        try:
            self.compression = parse_compression(self.manifest.get("compression", "zstd"))
        except ValueError as e:
            raise StoreError(f"{self.location}: {e}") from e
        self._scales = {}  # int8 stores: frames/features and clips/latents -> their float32 scale arrays
        if self.compression.lossy == "int8":
            try:
                self._scales = {name: self.group[s] for name, s in SCALES.items()}
            except KeyError as e:
                raise DamagedStoreError(self.location, str(e).strip("'\""), None, "the array is missing") from e
        # uncompressed chunks of a local store are read straight from their files (pipeline/store/direct.py)
        self._direct = {}
        if not self._scales and cached is None and (not is_url(self.location) or self.location.startswith("file://")):
            root = filesystem(self.location)[1]
            self._direct = {name: DirectArray.of(arrays[name], root) for name in ("frames/features", "clips/latents")}
            self._direct = {name: d for name, d in self._direct.items() if d is not None}
        valid = self._read_small(arrays["clips/valid"], "clips/valid")
        self._feature_rows = self._read_small(arrays["clips/feature_rows"], "clips/feature_rows")
        self._check_clip_table(valid)
        v = self.num_variants
        self._clip_rows = np.flatnonzero(valid.reshape(-1, v).all(axis=1)) * v  # first row of each clip

    def _read_small(self, arr, name: str) -> np.ndarray:
        try:
            return arr[...]
        except DECODE_ERRORS as e:
            raise DamagedStoreError(self.location, name, None, decode_reason(e)) from e

    def _check_shapes(self, arrays: dict) -> None:
        """Every shape against the manifest's counts and geometry, before anything is read or allocated."""
        g, counts, v = self.geometry, self.manifest.get("counts"), len(self.variants)
        if not (
            0 < v <= 2
            and isinstance(counts, dict)
            and _int_in(counts.get("frames"), 1, _MAX_ROWS)
            and _int_in(counts.get("clips"), 1, _MAX_ROWS)
        ):
            raise StoreError(
                f"{self.location}: the manifest's variants {self.variants} or counts {counts} are "
                f"not a store's (1..{_MAX_ROWS} clips and frames, 1 or 2 variants)"
            )
        rows, frames = counts["clips"] * v, counts["frames"] * v
        want = {
            "frames/features": (frames, *g.features_shape[1:]),
            "clips/latents": (rows, *g.latents_shape),
            "clips/valid": (rows,),
            "clips/feature_rows": (rows, g.latent_frames),
        }
        got = {name: arrays[name].shape for name in want}
        if "pca" in self.group and "components" in self.group["pca"]:
            want["pca/components"] = (g.num_pca_channels, g.feature_dim)
            got["pca/components"] = self.group["pca/components"].shape
        if "pseudo_depth" in self.manifest:
            want[PSEUDO_DEPTH] = (frames, *self._pseudo_depth_hw())
            try:
                got[PSEUDO_DEPTH] = self.group[PSEUDO_DEPTH].shape
            except KeyError as e:
                raise DamagedStoreError(self.location, PSEUDO_DEPTH, None, "the array is missing") from e
        for name in want:
            if tuple(got[name]) != tuple(want[name]):
                raise StoreError(
                    f"{self.location}: {name} has shape {list(got[name])}, but the manifest's counts "
                    f"and geometry say {list(want[name])}: the store is damaged or forged"
                )
        recorded = self.group["pca"].attrs.get("fingerprint") if "pca" in self.group else None
        if recorded is not None and recorded != self.pca_fingerprint:
            raise StoreError(
                f"{self.location}: pca/ holds basis {str(recorded)[:12]}, but the manifest says "
                f"{str(self.pca_fingerprint)[:12]}: the basis was swapped; features would be "
                "read in the wrong space"
            )

    def _pseudo_depth_hw(self) -> tuple[int, int]:
        """The map size the manifest's pseudo_depth scale gives at this geometry (refused when out of bounds)."""
        entry = self.manifest["pseudo_depth"]
        try:
            return pseudo_depth_hw(self.geometry, entry.get("scale") if isinstance(entry, dict) else None)
        except ValueError as e:
            raise StoreError(f"{self.location}: the manifest's pseudo_depth is refused: {e}") from e

    def _check_clip_table(self, valid: np.ndarray) -> None:
        """The small arrays read at open must agree with the manifest: a missing chunk of them reads as
        fill values (no clip valid, every clip on frame 0) and would silently change what is served."""
        frames, v = self.manifest["counts"]["frames"] * len(self.variants), len(self.variants)
        recorded = self.manifest["counts"].get("valid_clips")
        if recorded is not None and int(valid.reshape(-1, v).all(axis=1).sum()) != recorded:
            raise DamagedStoreError(
                self.location,
                "clips/valid",
                None,
                f"it marks {int(valid.sum()) // v} clips usable, the manifest counted {recorded}",
            )
        used = self._feature_rows[valid]
        distinct = np.all(np.diff(np.sort(used, axis=1), axis=1) > 0)
        if used.size and (used.min() < 0 or used.max() >= frames or not distinct):
            raise DamagedStoreError(
                self.location,
                "clips/feature_rows",
                None,
                f"a clip's rows must be distinct and lie in 0..{frames - 1} (a missing chunk reads as zeros)",
            )

    def __len__(self) -> int:
        return len(self._clip_rows)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Store({self.location!r}, dataset={m.get('dataset')!r}, split={m.get('split')!r}, "
            f"clips={len(self)}, variants={self.variants}, pca={self.pca_fingerprint[:12]})"
        )

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
        try:
            return PCABasis.load(self.group["pca"])
        except (KeyError, *DECODE_ERRORS) as e:  # a deleted or damaged chunk, a missing array
            raise DamagedStoreError(self.location, "pca", None, str(e).strip("'\"")) from e

    @property
    def has_pred_features(self) -> bool:
        return "pred_features" in self.group["clips"] and bool(
            self.group["clips/pred_features"].attrs.get("complete", False)
        )

    @property
    def pred_features_fingerprint(self) -> str | None:
        if "pred_features" not in self.group["clips"]:
            return None
        return self.group["clips/pred_features"].attrs.get("checkpoint_fingerprint")

    @property
    def has_pseudo_depth(self) -> bool:
        """Whether the cache job stored Depth Anything's relative disparity of every frame (--pseudo-depth)."""
        return "pseudo_depth" in self.manifest

    def read_pseudo_depth_row(self, row: int) -> np.ndarray:
        """[h, w] float16: one stored frame row's relative disparity (manifest "pseudo_depth": its scale and
        model). A missing chunk reads as NaN (the array's fill value) and is refused, as is any non-finite value."""
        if not self.has_pseudo_depth:
            raise StoreError(
                f"{self.location} holds no pseudo-depth: cache it with `python -m jobs.cache --pseudo-depth`"
            )
        d = self._read_row(self.group[PSEUDO_DEPTH], PSEUDO_DEPTH, row, ())
        if not np.isfinite(d).all():
            raise DamagedStoreError(
                self.location, PSEUDO_DEPTH, row, "it holds NaN/Inf (a chunk missing on disk reads as NaN)"
            )
        return d

    def read_pseudo_depth(self, i: int, variant: int = 0) -> np.ndarray:
        """[7, h, w] float16: the relative disparity of the clip's feature frames."""
        return np.stack([self.read_pseudo_depth_row(int(r)) for r in self._feature_rows[self.row(i, variant)]])

    def feature_rows(self, i: int, variant: int = 0) -> np.ndarray:
        """The stored frame rows (of frames/features) of the clip's 7 feature frames: what read_features reads.
        Public for tools that read or time the arrays themselves (benchmarks/bench_loader.py)."""
        return self._feature_rows[self.row(i, variant)]

    @property
    def features_array(self) -> zarr.Array:
        """frames/features as stored, [frame rows, H, W, C]: the Zarr array itself, for tools that time or
        inspect the raw reads (benchmarks/bench_loader.py). Reads through it skip every check of
        read_features (missing chunks, NaN/Inf, int8 scales): a trainer reads through read_features."""
        return self._features

    @property
    def latents_array(self) -> zarr.Array:
        """clips/latents as stored, [clip rows, 16, 7, h, w]: the Zarr array itself, as features_array (rows,
        not clip numbers: `row(i)`); a trainer reads through read_latents."""
        return self._latents

    def row(self, i: int, variant: int = 0) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"clip {i} out of range for {self.location} ({len(self)} clips)")
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} out of range ({self.variants})")
        return int(self._clip_rows[i]) + variant

    def _channels(self, channels: int | None) -> int:
        c = self.num_channels if channels is None else int(channels)
        if not 0 < c <= self.num_channels:
            raise StoreError(
                f"{self.location} holds {self.num_channels} PCA channels: channels must be in "
                f"1..{self.num_channels}, got {channels}"
            )
        return c

    def read_features(
        self,
        i: int,
        channels: int | None = None,
        variant: int = 0,
        out: np.ndarray | None = None,
        frames: slice | None = None,
    ) -> np.ndarray:
        """[7, H, W, c] float16: the first c PCA channels of the clip's 7 feature frames (`frames`: only
        those of a slice of them). `out`: a C-contiguous array of that shape to decode into (a slot of a
        batch buffer), returned."""
        rows = self._feature_rows[self.row(i, variant)]
        if frames is not None:
            rows = rows[frames]
        c = self._channels(channels)
        if "frames/features" in self._direct:  # uncompressed: each row's chunks straight into `out`
            if out is None:
                out = np.empty((len(rows), *self.geometry.feature_hw, c), np.float16)
            for k, r in enumerate(rows):
                self.read_feature_row(int(r), c, out[k])
            return out
        # basic slices only: an integer-array selection makes zarr's sharding codec index every
        # element (about 15x slower). A clip's rows are usually evenly spaced: one strided slice.
        step = rows[1] - rows[0] if len(rows) > 1 else 1
        try:
            if step > 0 and np.all(np.diff(rows) == step):
                sel = (slice(rows[0], rows[-1] + 1, step), slice(None), slice(None), slice(0, c))
                if self._scales:  # int8: decode, then scale to float16 (into `out` when given)
                    scale = self._scales["frames/features"][sel[0], :c]
                    out = _into(out, dequantize_int8(self._features[sel], scale[:, None, None, :]))
                else:
                    out = _read(self._features, sel, out)
            elif out is None:
                out = np.stack([self.read_feature_row(int(r), c) for r in rows])
            else:
                for k, r in enumerate(rows):
                    self.read_feature_row(int(r), c, out[k])
        except DECODE_ERRORS:
            for r in rows:  # name the row that fails
                self._read_row(self._features, "frames/features", int(r), (slice(None), slice(None), slice(0, c)))
            raise
        for r, frame in zip(rows, out):
            self._check_present(frame, "frames/features", int(r))
            self._check_finite(frame, "frames/features", int(r))
        return out

    def feature_block(self, channels: int | None = None) -> int:
        """The channel block in which read_feature_blocks reads the first c channels in one pass: the store's
        channel chunk when its features are read directly (uncompressed, local) and c is whole chunks, else c
        (one block: the row layout, as read_features)."""
        c = self._channels(channels)
        direct = self._direct.get("frames/features")
        k = direct.block(c) if direct is not None else None
        return k or c

    def read_feature_blocks(self, i: int, out: np.ndarray, variant: int = 0, frames: slice | None = None) -> np.ndarray:
        """The clip's features channel-blocked: out [F, nb, H, W, k] (k: the store's channel chunk, read
        directly) gets channels j*k .. (j+1)*k - 1 of frame f in out[f, j], each chunk read from its file
        straight there."""
        rows = self._feature_rows[self.row(i, variant)]
        rows = rows if frames is None else rows[frames]
        direct = self._direct.get("frames/features")
        if len(rows) != len(out) or direct is None or direct.block(out.shape[1] * out.shape[-1]) != out.shape[-1]:
            shape = f"[{len(rows)}, blocks, H, W, channel chunk]"
            raise ValueError(f"out {list(out.shape)} is not {shape} of {self.location}")
        for k, r in enumerate(rows):
            self._direct_read("frames/features", int(r), direct.read_blocks, out[k])
        return out

    def _direct_read(self, name: str, row: int, read, out: np.ndarray) -> np.ndarray:
        """read(row, out) of a DirectArray, its damage raised as the store's DamagedStoreError."""
        try:
            return read(row, out)
        except ChunkDamage as e:
            raise DamagedStoreError(self.location, name, row, str(e)) from e
        except OSError as e:
            raise DamagedStoreError(self.location, name, row, decode_reason(e)) from e

    def read_feature_row(self, row: int, channels: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """[H, W, c] float16: one stored frame row (not a clip number), int8 stores un-quantized; NaN/Inf refused."""
        c = self._channels(channels)
        rest = (slice(None), slice(None), slice(0, c))
        if not self._scales:
            return self._read_row(self._features, "frames/features", row, rest, out, check_finite=True)
        f = self._read_row(self._features, "frames/features", row, rest)
        scale = self._read_row(self._scales["frames/features"], "frames/feature_scales", row, (slice(0, c),))
        f = _into(out, dequantize_int8(f, scale))
        self._check_finite(f, "frames/features", row)
        return f

    def read_latent_row(self, row: int, out: np.ndarray | None = None) -> np.ndarray:
        """[16, 7, h, w] float16: one stored clip row, int8 stores un-quantized; NaN/Inf refused."""
        if not self._scales:
            return self._read_row(self._latents, "clips/latents", row, (), out, check_finite=True)
        z = self._read_row(self._latents, "clips/latents", row, ())
        scale = self._read_row(self._scales["clips/latents"], "clips/latent_scales", row, ())
        z = _into(out, dequantize_int8(z, scale[:, None, None, None]))
        self._check_finite(z, "clips/latents", row)
        return z

    def read_latents(self, i: int, variant: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """[16, 7, h, w] float16 (`out`: as in read_features)."""
        row = self.row(i, variant)
        z = self.read_latent_row(row, out)
        self._check_present(z, "clips/latents", row)
        return z

    def read_pred_features(
        self, i: int, channels: int | None = None, variant: int = 0, out: np.ndarray | None = None
    ) -> np.ndarray:
        """[3, H, W, c] float16: Stage 1's rollout for latents 4-6 (written by the rollout job)."""
        if not self.has_pred_features:
            raise StoreError(
                f"{self.location} has no finished clips/pred_features: run the rollout job first (make rollout)"
            )
        arr, row, c = self.group["clips/pred_features"], self.row(i, variant), self._channels(channels)
        rest = (slice(None), slice(None), slice(None), slice(0, c))
        p = self._read_row(arr, "clips/pred_features", row, rest, out, check_finite=True)
        predicted = min(c, int(arr.attrs.get("channels", c)))  # channels past these are zeros by design
        for frame in p:
            self._check_present(frame[..., :predicted], "clips/pred_features", row)
        return p

    def _read_row(
        self, arr, name: str, row: int, rest: tuple, out: np.ndarray | None = None, check_finite: bool = False
    ) -> np.ndarray:
        """arr[row, *rest] (rest: () or full slices then a prefix slice(0, c) of the last axis), into `out`;
        `check_finite`: a row holding NaN/Inf is damage too (verify counts them itself)."""
        direct = self._direct.get(name)
        if direct is not None and arr.path == direct.array.path:
            if out is None:
                c = rest[-1].stop if rest else direct.row_shape[-1]
                out = np.empty((*direct.row_shape[:-1], c), direct.dtype)
            return self._direct_read(name, row, lambda r, o: direct.read(r, o, check_finite), out)
        try:
            a = _read(arr, (row, *rest), out)
        except DECODE_ERRORS as e:
            raise DamagedStoreError(self.location, name, row, decode_reason(e)) from e
        if check_finite:
            self._check_finite(a, name, row)
        return a

    def _check_present(self, a: np.ndarray, name: str, row: int) -> None:
        """Refuse a row holding a chunk that reads as fill values (zeros): its object is missing on disk.
        The writer stores every chunk (write_empty_chunks), and no encoder output is an exact-zero chunk.
        Cheap: one pixel per channel chunk decides, a whole chunk is scanned only when that pixel is zero.
        Rows read directly need no check: their reader finds every chunk it reads in the shard index."""
        if name in self._direct:
            return
        cc = self._channel_chunk(name, a.shape[-1])
        if name == "clips/latents":
            if not a.reshape(-1)[:4096].any() and not a.any():
                raise DamagedStoreError(self.location, name, row, "its chunk is missing (reads as fill values)")
            return
        for k in range(0, a.shape[-1], cc):
            block = a[..., k : k + cc]
            if not block[(0,) * (block.ndim - 1)].any() and not block.any():
                if k == 0 and not a.any():
                    raise DamagedStoreError(
                        self.location, name, row, "all its chunks are missing (reads as fill values)"
                    )
                last = k + block.shape[-1] - 1
                raise DamagedStoreError(
                    self.location, name, row, f"the chunk of channels {k}..{last} is missing (reads as fill values)"
                )

    def _check_finite(self, a: np.ndarray, name: str, row: int) -> None:
        """Refuse a row holding NaN or Inf: written so, or changed through Zarr (its checksums then pass), it is
        damage all the same, and one such value makes a training loss NaN."""
        if not finite(a):
            raise DamagedStoreError(self.location, name, row, NONFINITE)

    def _channel_chunk(self, name: str, c: int) -> int:
        chunk = self.manifest.get("channel_chunk")
        return int(chunk) if isinstance(chunk, int) and chunk > 0 else c

    @cached_property
    def clip_table(self) -> dict[str, np.ndarray]:
        """Per-row clip metadata (id, scene, start, timestamps), read once: rows, not clip numbers."""
        c = self.group["clips"]
        try:
            table = {k: c[k][...] for k in ("id", "scene", "start", "timestamps")}
            table["id"], table["scene"] = decode_strings(table["id"]), decode_strings(table["scene"])
        except (KeyError, *DECODE_ERRORS) as e:
            raise DamagedStoreError(
                self.location, "clips/id, scene, start or timestamps", None, decode_reason(e)
            ) from e
        if any(not str(table["id"][r]) for r in self._clip_rows):
            raise DamagedStoreError(self.location, "clips/id", None, "usable clips have empty ids (fill values)")
        return table

    def clip_meta(self, i: int, variant: int = 0) -> dict:
        r, t = self.row(i, variant), self.clip_table
        return {
            "clip_id": str(t["id"][r]),
            "scene": str(t["scene"][r]),
            "start": int(t["start"][r]),
            "timestamps": t["timestamps"][r].tolist(),
            "variant": self.variants[variant],
        }

    def read_clip(self, i: int, channels: int | None = None, variant: int = 0, with_pred: bool = False) -> ClipArrays:
        meta = self.clip_meta(i, variant)
        return ClipArrays(
            meta["clip_id"],
            self.read_features(i, channels, variant),
            self.read_latents(i, variant),
            meta,
            self.read_pred_features(i, channels, variant) if with_pred else None,
        )

    def failures(self) -> list[dict]:
        if "failures" not in self.group:
            return []
        fg = self.group["failures"]
        try:
            cols = {k: decode_strings(fg[k][...]) for k in ("clip_id", "file", "reason")}
        except (KeyError, *DECODE_ERRORS) as e:
            raise DamagedStoreError(self.location, "failures", None, decode_reason(e)) from e
        return [{k: str(cols[k][j]) for k in cols} for j in range(len(cols["clip_id"]))]

    def unit_records(self) -> list[dict]:
        fs, root = filesystem(self.location, self.storage_options)
        return [json.loads(fs.cat_file(p)) for p in sorted(fs.glob(f"{root}/progress/*.json"))]

    def check_rows(self, name: str, rows) -> Iterator[tuple[int, np.ndarray | DamagedStoreError]]:
        """Read each of `rows` of array `name` ("frames/features", "clips/latents", "clips/pred_features" or the
        pseudo-depth maps) as stored and check it, for `verify`: each must decode (crc32c, codec, shard index),
        its int8 scales too, and have all its chunks on disk (none reading as fill values; for pseudo depth,
        none reading as NaN). Yields (row, the row's values) or (row, the DamagedStoreError that refused it);
        a bad row never stops the others. NaN/Inf in a row are not refused here: the caller counts them."""
        arr = self.group[name]
        predicted = int(arr.attrs.get("channels", arr.shape[-1])) if name == "clips/pred_features" else None
        for row in rows:
            try:
                if name == PSEUDO_DEPTH:  # its reader refuses NaN, its fill value: a chunk missing on disk
                    a = self.read_pseudo_depth_row(row)
                else:
                    a = self._read_row(arr, name, row, ())
                    if name in self._scales:  # int8 stores: the row's scales must read too
                        self._read_row(self._scales[name], self._scales[name].path, row, ())
                    for part in a if name == "clips/pred_features" else [a]:
                        self._check_present(part[..., :predicted] if predicted else part, name, row)
            except DamagedStoreError as e:
                yield row, e
                continue
            yield row, a

    def verify(self, progress: bool = False) -> dict:
        """Read every row this store says it holds and check it (pipeline/store/verify.py): a report
        whose "bad_rows" lists (array, row, reason) for each problem, and "ok"."""
        from .verify import verify_store

        return verify_store(self, progress)


def _read(array, selection: tuple, out: np.ndarray | None) -> np.ndarray:
    """A basic selection of a Zarr array, decoded into `out` when given (no copy of the result)."""
    if out is None:
        return array[selection]
    from zarr.core.buffer.cpu import NDBuffer

    array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
    return out


def _into(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """`values`, copied into `out` when the caller gave a buffer."""
    if out is None:
        return values
    out[...] = values
    return out


def open_stores(locations: list[str], storage_options: dict | None = None) -> list[Store]:
    """Open several stores for one training run, refusing mixed feature spaces or geometries."""
    stores = [Store(loc, storage_options) for loc in locations]
    check_compatible([s.manifest for s in stores], [s.location for s in stores])
    check_prefix_bases(stores)
    return stores


def check_prefix_bases(stores: list[Store]) -> None:
    """Stores whose manifests say their bases are prefixes of one basis must hold exactly that: the shorter
    basis equal to the first components of the longer (a forged or mistaken `prefix_of` is refused)."""
    longest = max(stores, key=lambda s: s.num_channels)
    for s in stores:
        if s.pca_fingerprint == longest.pca_fingerprint:
            continue
        a, b = s.basis, longest.basis
        if not (
            np.array_equal(a.mean, b.mean)
            and np.array_equal(a.std, b.std)
            and np.array_equal(a.components, b.components[: a.num_components])
        ):
            raise IncompatibleStoresError(
                "pca.prefix_of", s.location, s.pca_fingerprint, longest.location, longest.pca_fingerprint
            )
