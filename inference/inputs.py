"""What prediction starts from: a clip of a store, or a video file / folder of frames encoded here.

A store holds latents, not pixels: a store clip comes with its ORIGINAL frames whenever the store's
source reopens from its manifest (pipeline/sources/reopen.py), read, checked against the stored
timestamps and resized to the VAE input size exactly as the cache job resized them; otherwise with
a record of why not. A video is read through the `videos` source and encoded as the cache job
encodes: 25 frames give 7 latents and a ground truth, 13-24 frames give the 4 context latents only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.sources import SourceError

from . import InferenceError
from .codec import LatentCodec, encode_features


@dataclass
class ClipInput:
    name: str
    features: np.ndarray  # [7 or 4, H, W, C] float32: ground-truth PCA features of frames 0, 4, ...
    latents: np.ndarray  # [16, 7 or 4, h, w] float32, store-normalized
    frames: np.ndarray | None  # uint8 [25 or 13, H, W, 3] at the VAE size (video input, or a store clip's
    fps: float  # source frames when its source reopens); None otherwise
    source: dict
    frames_kind: str = "video"  # what `frames` are: "video" or "source_frames"


@dataclass
class DataSpace:
    """The geometry, PCA basis, manifest and frame rate the models and the data share."""

    geometry: object
    basis: object
    manifest: dict | None
    fps: float

    @classmethod
    def of_store(cls, store, basis: bool = True) -> DataSpace:
        return cls(
            store.geometry, store.basis if basis else None, store.manifest, float(store.manifest.get("fps") or 10.0)
        )

    @property
    def latent_norm(self) -> dict | None:
        return (self.manifest or {}).get("latent_norm")


def open_space(store: str | None, video: bool = False, pca: str | None = None, geometry: str | None = None):
    """(DataSpace, Store or None) from a store (its PCA basis only for a video), or for a video from a
    PCA basis and a geometry name."""
    if store:
        from pipeline.store.reader import Store

        opened = Store(store)
        return DataSpace.of_store(opened, basis=video), opened
    if not video or not pca:
        raise InferenceError("give --store (a clip of it, or its PCA basis for --video), or --video with --pca")
    from pipeline.pca import load_basis
    from pipeline.store.geometry import resolve_geometry

    g = resolve_geometry(geometry)
    basis = load_basis(pca)
    if basis.num_components < g.num_pca_channels or basis.feature_dim != g.feature_dim:
        raise InferenceError(
            f"--pca {pca} has {basis.num_components} components of {basis.feature_dim}-d "
            f"features; geometry {geometry} needs {g.num_pca_channels} of {g.feature_dim}"
        )
    return DataSpace(g, basis, None, 10.0), None


def store_clip(store, clip: int, clip_id: str | None = None, source_frames: bool = True) -> ClipInput:
    """A clip of the store; with `source_frames`, its original frames too when the source reopens."""
    from pipeline.store.format import StoreError

    if clip_id is not None:
        if clip_id not in store.clip_ids:
            raise StoreError(f"{store.location} has no clip {clip_id!r}")
        clip = store.clip_ids.index(clip_id)
    arrays = store.read_clip(clip)
    frames, origin = None, {"opened": False, "reason": "not asked for"}
    if source_frames:
        frames, origin = source_clip_frames(store.manifest, arrays.meta, store.geometry)
    info = {"store": store.location, "clip": clip, "clip_id": arrays.clip_id, "ground_truth_source": origin}
    return ClipInput(
        arrays.clip_id,
        arrays.features.astype(np.float32),
        arrays.latents.astype(np.float32),
        frames,
        float(store.manifest.get("fps") or 10.0),
        info,
        "source_frames",
    )


def source_clip_frames(manifest: dict, meta: dict, geometry) -> tuple[np.ndarray | None, dict]:
    """The clip's original frames, uint8 [25, *vae_input_hw, 3] resized as the cache job resizes (and
    mirrored for a flip variant), or None; and a record of where they came from (or why not)."""
    from pipeline.frames import hflip, resize_frames
    from pipeline.sources.reopen import reopen_source

    source, why = reopen_source(manifest)
    where = {
        "dataset": manifest.get("dataset"),
        "split": manifest.get("split"),
        "source_root": manifest.get("source_root"),
        "scene": meta.get("scene"),
    }
    if source is None:
        return None, {"opened": False, "reason": why, **where}
    try:
        start, n = int(meta["start"]), geometry.clip_frames
        refs = source.frames(meta["scene"])[start : start + n]
        stamps = meta.get("timestamps") or []
        if len(refs) != n or (len(stamps) == n and not np.allclose([r.timestamp for r in refs], stamps, atol=1e-3)):
            return None, {"opened": False, "reason": "the source's frames no longer match the store's clip", **where}
        frames = resize_frames(np.stack([source.read_frame(meta["scene"], r) for r in refs]), geometry.vae_input_hw)
    except Exception as e:  # noqa: BLE001 - any failure just means: the VAE reconstruction instead
        return None, {"opened": False, "reason": f"{type(e).__name__}: {e}", **where}
    if meta.get("variant") in ("flip", "hflip"):
        frames = hflip(frames)
    return frames, {"opened": True, **where, "frames": [refs[0].index, refs[-1].index]}


def video_clip(path: str, space: DataSpace, dino, codec: LatentCodec) -> ClipInput:
    """Encode a video file or a folder of frames here: its first 25 frames (with ground truth) or 13
    (context only). A folder's frames play at the data's frame rate, a video's at its own."""
    from pipeline.frames import resize_frames
    from pipeline.sources.videos import VideoFolderSource

    g = space.geometry
    if not Path(path).exists():
        raise SourceError(f"--video {path}: no such file or folder")
    source = VideoFolderSource(path, fps=None if Path(path).is_file() else space.fps)
    scenes = source.scenes()
    if len(scenes) > 1:
        raise SourceError(
            f"--video {path} holds {len(scenes)} scenes ({', '.join(scenes[:3])}, ...): give one "
            "video file or one folder of frames"
        )
    refs = source.frames(scenes[0])[: g.clip_frames] if scenes else []
    if len(refs) < g.context_frames:
        raise SourceError(
            f"--video {path} has {len(refs)} frames; prediction needs at least {g.context_frames} "
            f"(context), {g.clip_frames} for a ground-truth row"
        )
    n = g.clip_frames if len(refs) >= g.clip_frames else g.context_frames
    frames = resize_frames(np.stack([source.read_frame(scenes[0], r) for r in refs[:n]]), g.vae_input_hw)
    latents = codec.encode(frames[None])[0].numpy()  # [16, 7 or 4, h, w]
    features = encode_features(dino, space.basis, frames[:: g.temporal_downsample], g)  # [7 or 4, H, W, C]
    return ClipInput(Path(path).stem, features, latents, frames, source.fps, {"video": str(path), "frames_used": n})
