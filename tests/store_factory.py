"""Build small stores through the real writer, with random arrays, for tests of the store and trainer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

import pipeline.store.location
from pipeline.clips import build_clip_index
from pipeline.sources.base import FrameRef, Source
from pipeline.store.basis import PCABasis
from pipeline.store.geometry import TINY, Geometry
from pipeline.store.writer import StoreWriter


class CountingSource(Source):
    """Scenes of blank frames: only the frame bookkeeping matters to the store."""

    name = "counting"

    def __init__(self, scenes: int = 2, frames: int = 29, fps: float = 10.0):
        self._n, self._f, self.fps, self.root, self.split = scenes, frames, fps, "mem://counting", "train"

    def scenes(self):
        return [f"scene-{i:02d}" for i in range(self._n)]

    def frames(self, scene):
        return [FrameRef(i, i / self.fps, f"{scene}/{i:04d}.png") for i in range(self._f)]

    def read_frame(self, scene, frame):
        return np.zeros((8, 8, 3), np.uint8)


def random_basis(geometry: Geometry, seed: int = 0) -> PCABasis:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((geometry.feature_dim, geometry.feature_dim)))
    c = geometry.num_pca_channels
    return PCABasis(
        rng.standard_normal(geometry.feature_dim).astype(np.float32),
        rng.uniform(0.5, 2, geometry.feature_dim).astype(np.float32),
        q[:c].astype(np.float32),
        np.sort(rng.uniform(0.1, 5, c))[::-1].astype(np.float32),
    )


ENCODERS = {
    "dinov2": {"name": "dinov2", "weights_id": "tiny", "sha256": "a" * 64, "layers": [1, 2, 3, 4]},
    "vae": {"name": "wan2.1-vae", "weights_id": "tiny", "sha256": "b" * 64},
}


def chunk_path(store: Path, array: str, row: int) -> Path:
    """The object on disk holding `row` of frames/features (its shard) or clips/latents (its chunk)."""
    parts = {"frames/features": 3, "clips/latents": 4, "clips/pred_features": 4}[array]
    return store.joinpath(*array.split("/"), "c", str(row), *["0"] * parts)


def make_store(
    path,
    *,
    scenes=2,
    frames=29,
    stride=4,
    geometry: Geometry = TINY,
    variants=("orig",),
    seed=0,
    basis_seed=0,
    finalize=True,
    fail_clips=(),
    encoders=None,
    source=None,
    **create_kwargs,
):
    """Write a store of random float16 arrays; returns (writer, index, arrays) where arrays maps
    ('features', frame_row) / ('latents', clip_row) to what was written. `source`: the Source whose clip
    index the store records (default: blank CountingSource frames)."""
    source = source if source is not None else CountingSource(scenes, frames)
    index = build_clip_index(source, geometry, stride=stride, progress=False)
    w = StoreWriter.create(
        str(path),
        index=index,
        geometry=geometry,
        basis=random_basis(geometry, basis_seed),
        source_info=source.describe(),
        encoders=encoders or ENCODERS,
        latent_norm={"mean": [0.0] * 16, "std": [1.0] * 16},
        variants=variants,
        clip_stride=stride,
        **create_kwargs,
    )
    rng = np.random.default_rng(seed)
    written = {}
    v = len(variants)
    h, wd = geometry.feature_hw
    for fr in range(len(index.frames) * v):
        written[("features", fr)] = rng.standard_normal((h, wd, geometry.num_pca_channels)).astype(np.float16)
    for cr in range(len(index.clips) * v):
        written[("latents", cr)] = rng.standard_normal(geometry.latents_shape).astype(np.float16)
    digests = {}
    for (kind, row), a in written.items():
        digests[f"{kind}/{row}"] = (w.write_features if kind == "features" else w.write_latents)(row, a)
    failures = [
        {"clip_id": index.clips[i].clip_id, "file": f"{index.clips[i].scene}/bad.png", "reason": "truncated PNG"}
        for i in fail_clips
    ]
    w.mark_unit_done(
        "unit-000000",
        clip_rows=range(len(index.clips) * v),
        frame_rows=range(len(index.frames) * v),
        failures=failures,
        digests=digests,
    )
    if finalize:
        w.finalize(["unit-000000"])
    return w, index, written


def synthetic_store(path, split="train", encoders=None):
    """A store indexed from a small synthetic source (2 clips) with random arrays: its labels
    (the source's class maps and depth) are the point."""
    from pipeline.sources.synthetic import SyntheticSource

    source = SyntheticSource(split=split, num_scenes=1, frames_per_scene=29, height=72, width=128)
    make_store(path, encoders=encoders, source=source)
    return path


@contextlib.contextmanager
def killed_at_second_write():
    """A job killed mid-way: pipeline.store.location.write_atomic raises KeyboardInterrupt on its second call
    (the second chunk's rows are written, its record is not); writes are real again after the block."""
    real = pipeline.store.location.write_atomic
    calls = {"n": 0}

    def dying_write(fs, path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(fs, path, data)

    pipeline.store.location.write_atomic = dying_write
    try:
        yield
    finally:
        pipeline.store.location.write_atomic = real
