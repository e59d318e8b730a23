"""The source and its clip index: the dataset adapter a config names, the clips of `--geometry`
(cut to --max-clips), and what made no clip, listed."""

from __future__ import annotations

import dataclasses
import sys

from ..errors import ConfigError, Re2pixError
from ..store.geometry import resolve_geometry
from .config import CacheConfig


def get_source(cfg: CacheConfig):
    from pipeline.sources import SOURCES, get_source

    if cfg.data_root is None and cfg.dataset != "synthetic" and cfg.dataset in SOURCES:
        raise ConfigError(f"--dataset {cfg.dataset} reads a folder: give it with --data-root DIR (make: DATA_ROOT=DIR)")
    return get_source(cfg.dataset, cfg.data_root, cfg.split, **cfg.source_options)


def build_index(cfg: CacheConfig, geometry=None, source=None):
    from pipeline.clips import build_clip_index

    geometry = geometry or resolve_geometry(cfg.geometry)
    source = source or get_source(cfg)
    index = build_clip_index(source, geometry, stride=cfg.stride, progress=cfg.progress)
    if cfg.max_clips is not None and len(index.clips) > cfg.max_clips:
        keep = index.clips[: cfg.max_clips]
        used = sorted({r for c in keep for r in c.feature_rows})
        remap = {r: i for i, r in enumerate(used)}
        keep = [type(c)(c.clip_id, c.scene, c.start, c.frames, tuple(remap[r] for r in c.feature_rows)) for c in keep]
        index = dataclasses.replace(index, clips=keep, frames=[index.frames[r] for r in used])
    for f in index.failures:
        print(f"skipped {f['file']}: {f['reason']}", file=sys.stderr)
    for f in index.ignored:
        print(f"ignored {f['file']}: {f['reason']}", file=sys.stderr)
    for note in index.notes:
        print(f"warning: {note}", file=sys.stderr)
    return source, geometry, index


def listed_inputs(index) -> list[dict]:
    """The store's failures table: unreadable scenes (their clips failed) and ignored inputs (no clip id)."""
    return index.failures + [{"clip_id": "", **f} for f in index.ignored]


def _checked_index(cfg: CacheConfig, geometry, source):
    source, geometry, index = build_index(cfg, geometry, source)
    if not index.clips:
        raise Re2pixError(
            f"{cfg.dataset} at {cfg.data_root}: no clip of {geometry.clip_frames} frames "
            f"(skipped windows: {index.skipped or 'none'}; unreadable: {len(index.failures)}; "
            f"ignored: {len(index.ignored)}, listed above)"
        )
    return source, geometry, index
