"""Cheap checks, before any encoder runs: the store's size against the disk, whether --out can be written
(and, on a cluster, seen from every node), and whether a finished store there was made by this command."""

from __future__ import annotations

import os
import shutil
import uuid

from ..errors import Re2pixError
from .config import CacheConfig, recorded_config


def estimated_bytes(index, geometry, variants: int, depth_hw: tuple[int, int] | None = None) -> int:
    """Uncompressed size of a store's features and latents (compression rarely saves more than ~1.4x), and
    of its pseudo-depth maps when `depth_hw`."""
    import math

    h, w = geometry.feature_hw
    features = len(index.frames) * variants * h * w * geometry.num_pca_channels * 2
    latents = len(index.clips) * variants * math.prod(geometry.latents_shape) * 2
    depth = len(index.frames) * variants * math.prod(depth_hw) * 2 if depth_hw else 0
    return features + latents + depth


def finished_store(cfg: CacheConfig) -> dict | None:
    """The manifest of a finished store at --out, or of one being appended to (None: nothing there yet, or
    an unfinished new store of ours). A folder that holds anything else is refused here, before any encoder runs."""
    from pipeline.store.writer import existing_store

    attrs = existing_store(cfg.out, cfg.storage_options or None)
    return attrs if attrs and (attrs.get("complete") or attrs.get("appending")) else None


# options free to change when a finished store grows: which scenes and clips there are, where the data is,
# how the job runs, and the basis (a store grows under its own one: store_settings compares it)
GROWTH_FREE = ("data_root", "max_clips", "unit_clips", "batch_frames", "batch_clips", "pca", "pca_frames")


def same_settings(manifest: dict, cfg: CacheConfig) -> tuple[str, object, object] | None:
    """None if a finished store was made by this command, its source free to have gained scenes; else the first
    option that differs, with its value there and now."""
    recorded, now = dict(manifest.get("cache_config", {})), recorded_config(cfg)
    if "dinov2" in recorded and "encoder" not in recorded:  # stores made before --dinov2 became --encoder
        recorded["encoder"] = recorded.pop("dinov2")
    for view in (recorded, now):
        for key in GROWTH_FREE:
            view.pop(key, None)
        if isinstance(view.get("source_options"), dict):  # the synthetic source's scene count
            view["source_options"] = {k: v for k, v in view["source_options"].items() if k != "num_scenes"}
    key = next((k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)), None)
    return None if key is None else (key, recorded.get(key), now.get(key))


def grown_index(cfg: CacheConfig, index):
    """The clip index of the store at --out grown by the source's new clips, and the clips and frames it
    already holds (clips.grow_index)."""
    from pipeline.clips import grow_index
    from pipeline.store.writer import stored_index

    ids, rows, frames = stored_index(cfg.out, cfg.storage_options or None)
    try:
        return grow_index(ids, rows, frames, index), len(ids), len(frames)
    except ValueError as e:
        raise Re2pixError(f"{cfg.out}: {e}; pass --overwrite to re-encode the store") from None


def check_writable(cfg: CacheConfig, need_bytes: int) -> None:
    """--out can be written and, for a local path, its disk has room for the store."""
    from pipeline.store.location import filesystem, is_url, write_atomic

    if is_url(cfg.out) and not cfg.out.startswith("file://"):
        fs, root = filesystem(cfg.out, cfg.storage_options or None)
        probe = f"{root}/.re2pix-probe-{uuid.uuid4().hex}"
        try:
            write_atomic(fs, probe, b"")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 -- any client error means: cannot write there
            raise Re2pixError(f"{cfg.out}: cannot write there ({type(e).__name__}: {e})") from e
        return
    path = cfg.out.removeprefix("file://")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise Re2pixError(f"{cfg.out}: {existing} is a file, not a folder")
    try:  # a real probe (permission bits say nothing for root or on network file systems)
        probe = os.path.join(existing, f".re2pix-probe-{uuid.uuid4().hex}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise Re2pixError(f"{cfg.out}: cannot write in {existing} ({e.strerror or e})") from e
    if not os.path.exists(path):  # a new store: room for all of it (a resumed one already holds part)
        free = shutil.disk_usage(existing).free
        if free < need_bytes:
            need = _size(need_bytes)
            raise Re2pixError(f"{cfg.out}: the store needs up to {need}, {existing} has {_size(free)} free")


def _size(n: int) -> str:
    """Bytes in the unit that keeps a figure readable (0.00 GiB said nothing of 3 MiB against 200 KiB)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} bytes"


def check_visible_from_every_node(cfg: CacheConfig, cluster) -> None:
    """A local --out on a multi-node cluster must be a folder every node sees (a shared file system)."""
    from pipeline.store.location import is_url

    if cluster.nodes < 2 or (is_url(cfg.out) and not cfg.out.startswith("file://")):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = os.path.dirname(cfg.out.removeprefix("file://").rstrip("/"))
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".re2pix-visible-{uuid.uuid4().hex}")
    open(probe, "wb").close()
    try:
        seen = ray.remote(num_cpus=0.01)(os.path.exists)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        found = ray.get(
            [
                seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe)
                for n in nodes
            ]
        )
    finally:
        os.remove(probe)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok]
    if blind:
        raise Re2pixError(
            f"{cfg.out} is a local path that node(s) {', '.join(blind)} do not see; use a folder "
            "shared by every node or an object-storage URL (s3://...)"
        )
