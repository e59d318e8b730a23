"""Writing a store: create every array at full size, fill rows from any number of workers, record
each finished work unit atomically, then finalize.

Rows: with V cached variants (orig, hflip), clip c's variant v is clip row c*V+v and frame f's is
frame row f*V+v. Each frame row is its own Zarr shard and each clip row its own chunk, so workers
that own disjoint rows never write the same object (Zarr loses writes when two processes share a
shard). Only the driver writes group attributes and the small metadata arrays.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json

import numpy as np
from zarr.codecs import Crc32cCodec

from .. import __version__
from ..clips import ClipIndex
from .basis import PCABasis
from .describe import publish
from .format import (
    DEFAULT_COMPRESSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    PSEUDO_DEPTH,
    PSEUDO_DEPTH_TARGET,
    STORE_LAYOUT,
    VARIANT_SUFFIX,
    StoreError,
    check_manifest,
    compatibility_view,
    decode_strings,
    digest,  # noqa: F401  (also imported from here: jobs/rollout.py, tests)
    encode_strings,
    pseudo_depth_hw,
)
from .geometry import Geometry
from .location import filesystem, open_group, write_atomic
from .lock import LOCK_FILE
from .lossy import SCALES, parse_compression, quantize_int8, trim_mantissa


def chunk_codecs(spec: str) -> tuple:
    """The spec's lossless compressor, then a crc32c checksum (a Zarr v3 codec): a changed byte in a chunk
    fails its read. Every array of a store uses these (the lossy step of a spec touches row values only)."""
    comp = parse_compression(spec).compressor()
    return (Crc32cCodec(),) if comp is None else (comp, Crc32cCodec())


# Zarr skips chunks equal to the fill value unless told otherwise; every row we write must be on disk,
# so that a chunk missing on disk always means damage (readers refuse fill values where data belongs).
ALL_CHUNKS = {"write_empty_chunks": True}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StoreWriter:
    """Handle on an unfinished store. `create` (driver) makes it; `open` (any worker) attaches."""

    def __init__(self, location: str, storage_options: dict | None = None):
        self.location = str(location)
        self.storage_options = storage_options
        self.group = open_group(location, mode="r+", storage_options=storage_options)
        self.manifest = dict(self.group.attrs)
        check_manifest(self.manifest, self.location, allow_incomplete=True)
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        self.variants = list(self.manifest["variants"])
        self.compression = parse_compression(self.manifest.get("compression", "zstd"))
        self.fs, self.root = filesystem(location, storage_options)

    # ---- creation (driver) -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        location: str,
        *,
        index: ClipIndex,
        geometry: Geometry,
        basis: PCABasis,
        source_info: dict,
        encoders: dict,
        latent_norm: dict,
        variants=("orig",),
        clip_stride: int = 1,
        channel_chunk: int = 128,
        compression: str = DEFAULT_COMPRESSION,
        extra: dict | None = None,
        storage_options: dict | None = None,
        overwrite: bool = False,
        pseudo_depth: dict | None = None,
        grow: tuple[int, int] | None = None,
    ) -> StoreWriter:
        """Make a new store, or attach to the unfinished one at `location` if it was started with the
        same manifest (a rerun after a kill resumes). A finished store is left alone unless
        `overwrite`; an unfinished store made with other settings is refused, naming the field.
        `pseudo_depth` {"scale": int, "model": its description}: the store also holds frames/pseudo_depth.
        `grow` (clips, frames) the store at `location` already holds: append the rest of `index`
        (clips.grow_index) to it instead, under its own settings (`_grow`)."""
        if basis.num_components != geometry.num_pca_channels or basis.feature_dim != geometry.feature_dim:
            raise ValueError(
                f"PCA basis is {basis.num_components}x{basis.feature_dim}, geometry wants "
                f"{geometry.num_pca_channels}x{geometry.feature_dim}"
            )
        if not index.clips:
            raise StoreError(f"{location}: the clip index is empty; nothing to store")
        lossy = parse_compression(compression).manifest_entry()  # refuses an unknown spec before anything
        bad = [v for v in variants if v not in VARIANT_SUFFIX]
        if bad or variants[0] != "orig":
            raise ValueError(f"variants must start with 'orig' and be among {list(VARIANT_SUFFIX)}: {variants}")
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pipeline_version": __version__,
            **source_info,
            "geometry": geometry.to_dict(),
            "encoders": encoders,
            "pca": {
                "fingerprint": basis.fingerprint,
                "num_components": basis.num_components,
                "feature_dim": basis.feature_dim,
            },
            "latent_norm": latent_norm,
            "variants": list(variants),
            "clip_stride": clip_stride,
            "compression": compression,
            **({"lossy": lossy} if lossy else {}),
            "channel_chunk": channel_chunk,
            "counts": {
                "clips": len(index.clips),
                "frames": len(index.frames),
                "rows": len(index.clips) * len(variants),
            },
            "clip_index_digest": _index_digest(index),
            "skipped_windows": index.skipped,
            **({"pseudo_depth": pseudo_depth_entry(geometry, **pseudo_depth)} if pseudo_depth else {}),
            **(extra or {}),
            "complete": False,
        }
        manifest["settings"] = store_settings(manifest)
        manifest["settings_digest"] = settings_digest(manifest["settings"])
        if grow is not None:
            return cls._grow(location, manifest, index, *grow, storage_options)
        existing = existing_store(location, storage_options)
        if existing is not None and not overwrite:
            if existing.get("complete"):
                raise StoreError(f"{location} is already a finished store; pass --overwrite to replace it")
            _check_resumable(existing, manifest, location)
            return cls(location, storage_options)
        if existing is not None:  # --overwrite: remove what this store's layout names, nothing else
            remove_store(location, storage_options)

        g = open_group(location, mode="a", storage_options=storage_options)
        manifest["created"] = _now()
        _write_metadata(g, index, geometry, basis, variants, channel_chunk, compression)
        if pseudo_depth:
            create_pseudo_depth(g, len(index.frames) * len(variants), manifest["pseudo_depth"]["shape"], compression)
        g.attrs.update(manifest)
        return cls(location, storage_options)

    @classmethod
    def _grow(cls, location: str, manifest: dict, index: ClipIndex, clips: int, frames: int, storage_options):
        """Start (or resume) appending clips `clips`.. and frames `frames`.. of `index` to a store made with
        the same settings. The store reads as unfinished from the first write (complete=false, "appending"
        names the generation) until finalize; its rows stay in place and are never rewritten."""
        g = open_group(location, mode="r+", storage_options=storage_options)
        existing = dict(g.attrs)
        _check_settings(existing, manifest, location, "is a store made with other settings")
        appending = existing.get("appending")
        if appending is None:
            if not existing.get("complete"):
                raise StoreError(f"{location} is an unfinished store: rerun the command that started it to resume")
            if "clips/pred_features" in g:
                raise StoreError(
                    f"{location} holds Stage 1 rollouts (clips/pred_features) the new clips would lack; cache "
                    "the new scenes into a store of their own with --pca of this one (training mixes both)"
                )
            appending = {
                "generation": existing.get("generation", 0) + 1,
                "clips": [clips, len(index.clips)],
                "frames": [frames, len(index.frames)],
                "clip_index_digest": manifest["clip_index_digest"],
                "started": _now(),
            }
            g.attrs.update({"complete": False, "appending": appending})  # first: from here on, unfinished
        elif appending["clip_index_digest"] != manifest["clip_index_digest"]:
            raise StoreError(
                f"{location}: the append started there was to {appending['clips'][1]} clips and the source "
                f"changed since (now {len(index.clips)}); pass --overwrite to re-encode the store"
            )
        v = len(existing["variants"])
        grow_row_arrays(g, (frames * v, len(index.frames) * v), (clips * v, len(index.clips) * v))
        valid = g["clips/valid"][: clips * v]  # the stored clips stay readable (allow_incomplete) meanwhile
        _write_index_columns(g, index, existing["variants"], existing["compression"])
        g["clips/valid"][: clips * v] = valid
        keep = ("counts", "clip_index_digest", "skipped_windows", "cache_config", "settings", "settings_digest")
        g.attrs.update({k: manifest[k] for k in keep if k in manifest})
        return cls(location, storage_options)

    # ---- rows (any worker) -------------------------------------------------------------------
    def write_features(self, frame_row: int, features: np.ndarray) -> str:
        """features [H, W, C] PCA-projected, stored as float16. Returns the digest of what was stored."""
        f = np.asarray(features, np.float16)
        expected = self.group["frames/features"].shape[1:]
        if f.shape != expected:
            raise ValueError(f"features for frame row {frame_row} have shape {f.shape}, store wants {expected}")
        return self._write_row("frames/features", frame_row, f, channel_axis=-1)

    def _write_row(self, name: str, row: int, a: np.ndarray, channel_axis: int) -> str:
        """Apply the spec's lossy step and write one row; the digest is of the stored values (what verify reads)."""
        comp = self.compression
        if comp.lossy == "trim":
            a = trim_mantissa(a, comp.mantissa_bits)
        elif comp.lossy == "int8":
            a, scale = quantize_int8(a, channel_axis)
            self.group[SCALES[name]][row] = scale  # its own chunk per row: one writer each
        self.group[name][row] = a
        return digest(a)

    def write_latents(self, clip_row: int, latents: np.ndarray) -> str:
        """latents [16, 7, h, w], normalized, stored as float16."""
        z = np.asarray(latents, np.float16)
        expected = self.group["clips/latents"].shape[1:]
        if z.shape != expected:
            raise ValueError(f"latents for clip row {clip_row} have shape {z.shape}, store wants {expected}")
        return self._write_row("clips/latents", clip_row, z, channel_axis=0)

    def write_pseudo_depth(self, frame_row: int, depth: np.ndarray) -> str:
        """depth [h, w]: the frame's relative disparity, stored as float16 (lossless whatever the spec)."""
        d = np.asarray(depth, np.float16)
        expected = self.group[PSEUDO_DEPTH].shape[1:]
        if d.shape != expected:
            raise ValueError(f"pseudo-depth for frame row {frame_row} has shape {d.shape}, store wants {expected}")
        self.group[PSEUDO_DEPTH][frame_row] = d
        return digest(d)

    # ---- progress ----------------------------------------------------------------------------
    # progress/*.json are the cache job's unit markers; other jobs (rollout) keep theirs in sub-folders
    def done_units(self) -> set[str]:
        return {p.rsplit("/", 1)[-1][: -len(".json")] for p in self.fs.glob(f"{self.root}/progress/*.json")}

    def mark_unit_done(self, unit: str, *, clip_rows, frame_rows, failures=(), digests=None) -> None:
        """Record, in one atomic write, that a unit's rows are on disk (call after writing them)."""
        record = {
            "unit": unit,
            "clip_rows": sorted(int(r) for r in clip_rows),
            "frame_rows": sorted(int(r) for r in frame_rows),
            "failures": list(failures),
            "digests": dict(sorted((digests or {}).items())),
        }
        write_atomic(self.fs, f"{self.root}/progress/{unit}.json", json.dumps(record, sort_keys=True).encode())

    def unit_records(self) -> list[dict]:
        paths = sorted(self.fs.glob(f"{self.root}/progress/*.json"))
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    def finalize(self, expected_units=None, card: bool = True) -> dict:
        """Mark valid clips, write the failures table, set complete=true (last), then write the store's card
        (README.md and card.json, pipeline/store/card.py) unless `card` is false."""
        records = self.unit_records()
        if expected_units is not None:
            missing = set(expected_units) - {r["unit"] for r in records}
            if missing:
                raise StoreError(
                    f"{self.location}: {len(missing)} work units are not done "
                    f"(e.g. {sorted(missing)[:3]}); rerun to resume"
                )
        clip_done = np.zeros(self.group["clips/id"].shape[0], bool)
        frame_done = np.zeros(self.group["frames/scene"].shape[0], bool)
        failures = []
        for r in records:
            clip_done[r["clip_rows"]] = True
            frame_done[r["frame_rows"]] = True
            failures += r["failures"]
        ids = decode_strings(self.group["clips/id"][...])
        failed_ids = {f["clip_id"] for f in failures if f["clip_id"]}  # "": an ignored input, no clip
        feature_rows = self.group["clips/feature_rows"][...]
        valid = clip_done & frame_done[feature_rows].all(axis=1) & ~np.isin(ids, list(failed_ids))
        # a clip is usable only if every variant of it is
        v = len(self.variants)
        valid = np.repeat(valid.reshape(-1, v).all(axis=1), v)
        self.group["clips/valid"][...] = valid
        write_failures(self.group, failures, self.manifest["compression"])
        counts = dict(
            self.manifest["counts"],
            valid_clips=int(valid.sum()) // v,
            failed_clips=len(failed_ids),
            done_units=len(records),
        )
        return self.mark_complete(counts, card)

    def mark_complete(self, counts: dict, card: bool = True) -> dict:
        """Set the final counts and complete=true (the last write of the store), then write its card.
        An append ends here too: its generation becomes the store's, in the same write."""
        done = {"counts": counts, "finished": _now(), "complete": True}
        appending = self.manifest.get("appending")
        if appending:
            done["generation"] = appending["generation"]
            done["appended"] = [*self.manifest.get("appended", []), {**appending, "finished": done["finished"]}]
            done["appending"] = None
        self.group.attrs.update(done)
        self.manifest = dict(self.group.attrs)
        if card:
            from .card import write_card

            write_card(self.location, self.storage_options)
        publish(self.location, self.storage_options)
        return counts

    # ---- Stage 1 rollouts (written later by the rollout job) ----------------------------------
    def create_pred_features(self, checkpoint_fingerprint: str, overwrite: bool = False):
        """clips/pred_features [rows, future_latents, H, W, C] float16 for Stage 2's mixed supervision."""
        g = self.geometry
        name = "clips/pred_features"
        if name in self.group and not overwrite:
            arr = self.group[name]
            if arr.attrs.get("checkpoint_fingerprint") != checkpoint_fingerprint:
                raise StoreError(
                    f"{self.location} holds rollouts of checkpoint "
                    f"{arr.attrs.get('checkpoint_fingerprint', '?')[:12]}; pass --overwrite "
                    f"to replace them with {checkpoint_fingerprint[:12]}"
                )
            return arr
        rows = self.group["clips/id"].shape[0]
        h, w = g.feature_hw
        c = g.num_pca_channels
        cc = min(self.manifest["channel_chunk"], c)
        arr = self.group.create_array(
            name,
            shape=(rows, g.future_latents, h, w, c),
            dtype="float16",
            chunks=(1, 1, h, w, cc),
            shards=(1, g.future_latents, h, w, c),
            compressors=chunk_codecs(self.manifest["compression"]),
            fill_value=0,
            overwrite=True,
            config=ALL_CHUNKS,
        )
        arr.attrs.update({"checkpoint_fingerprint": checkpoint_fingerprint, "complete": False})
        return arr

    def write_pred_features(self, clip_row: int, pred: np.ndarray) -> None:
        """pred [3, H, W, C]: Stage 1's rollout for latents 4-6 of one clip row."""
        arr = self.group["clips/pred_features"]
        p = np.asarray(pred, np.float16)
        if p.shape != arr.shape[1:]:
            raise ValueError(f"pred_features for clip row {clip_row} have shape {p.shape}, store wants {arr.shape[1:]}")
        arr[clip_row] = p

    def finish_pred_features(self) -> None:
        self.group["clips/pred_features"].attrs["complete"] = True
        if self.group.attrs.get("complete"):  # a rollout into a finished store (a copy publishes at its end)
            publish(self.location, self.storage_options)


def _index_digest(index: ClipIndex) -> str:
    h = hashlib.sha256()
    for c in index.clips:
        h.update(f"{c.clip_id}|{c.feature_rows}|{[f.index for f in c.frames]}\n".encode())
    return h.hexdigest()


def existing_store(location: str, storage_options: dict | None) -> dict | None:
    """The manifest of the re2pix store at `location`, or None where there is nothing (no folder, or an
    empty one). Anything else there is refused whatever the flags: a writer never clears a folder it
    did not make."""
    fs, root = filesystem(location, storage_options)
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        raise StoreError(f"{location} is a file, not a folder: refusing to write a store there")
    entries = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    entries = [e for e in entries if e and e != root.rstrip("/").rsplit("/", 1)[-1] and e != LOCK_FILE]
    if not entries:
        return None
    attrs = None
    if "zarr.json" in entries:
        try:
            attrs = json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes", {})
        except (ValueError, AttributeError, OSError):
            attrs = None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise StoreError(
            f"{location} is not empty and is not a re2pix store (it holds {shown}): refusing to "
            "write there, with or without --overwrite; choose a new or empty folder"
        )
    return attrs


def remove_store(location: str, storage_options: dict | None = None) -> None:
    """Delete a re2pix store's own entries (its layout: zarr.json, pca/, frames/, clips/, failures/,
    progress/) and nothing else that shares the folder."""
    from .card import remove_card

    fs, root = filesystem(location, storage_options)
    remove_card(fs, root)
    for name in STORE_LAYOUT:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


# Settings that change what a store holds, beside compatibility_view's (encoders and their weights' hashes,
# geometry, latent normalization, PCA basis): the source's (as its describe() records them) and the cache's.
SOURCE_SETTINGS = ("dataset", "split", "fps", "eval_clip", "camera", "version", "channel", "generator")
CACHE_SETTINGS = ("variants", "clip_stride", "compression", "channel_chunk", "pseudo_depth")


def store_settings(manifest: dict) -> dict:
    """Every setting that changes what a store holds, by dotted name (the manifest's "settings"). Which
    scenes the source has is no setting: a store whose source gained scenes grows under the same ones."""
    view = compatibility_view(manifest)
    view["pca.stored"] = manifest.get("pca")  # the exact basis too, not only the one it is a prefix of
    view["geometry.num_pca_channels"] = manifest.get("geometry", {}).get("num_pca_channels")
    for key in SOURCE_SETTINGS + CACHE_SETTINGS:
        view[key] = manifest.get(key)
    if isinstance(view["generator"], dict):  # the synthetic source: its scene count only says how many
        view["generator"] = {k: v for k, v in view["generator"].items() if k != "num_scenes"}
    return json.loads(json.dumps(view))  # as read back from the store: lists, not tuples


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _check_settings(existing: dict, manifest: dict, location: str, what: str, also=()) -> None:
    """Refuse, naming the first differing setting, a store at `location` made otherwise than `manifest`."""
    a, b = store_settings(existing), store_settings(manifest)
    for key in also:
        a[key], b[key] = existing.get(key), manifest.get(key)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise StoreError(
                f"{location} {what} ({key}: {a.get(key)!r} there, {b.get(key)!r} now); pass --overwrite to re-encode it"
            )


def _check_resumable(existing: dict, manifest: dict, location: str) -> None:
    _check_settings(
        existing, manifest, location, "is an unfinished store started with other settings", also=("clip_index_digest",)
    )


def stored_index(location: str, storage_options: dict | None = None) -> tuple[list, list, list]:
    """What a store held before any append under way: clip ids, each clip's feature frame rows and the
    frames [(scene, FrameRef)], of the original variant (clips.grow_index's `stored_*`)."""
    from ..sources.base import FrameRef

    g = open_group(location, mode="r", storage_options=storage_options)
    m = dict(g.attrs)
    v, appending = len(m["variants"]), m.get("appending")
    nc, nf = (
        (appending["clips"][0], appending["frames"][0]) if appending else (m["counts"]["clips"], m["counts"]["frames"])
    )
    ids = list(decode_strings(g["clips/id"][: nc * v : v]))
    rows = (g["clips/feature_rows"][: nc * v : v] // v).tolist()
    scenes, paths = decode_strings(g["frames/scene"][: nf * v : v]), decode_strings(g["frames/path"][: nf * v : v])
    index, stamps = g["frames/index"][: nf * v : v], g["frames/timestamp"][: nf * v : v]
    frames = [(str(s), FrameRef(int(i), float(t), str(p))) for s, i, t, p in zip(scenes, index, stamps, paths)]
    return ids, rows, frames


def grow_row_arrays(g, frame_rows: tuple[int, int], clip_rows: tuple[int, int]) -> None:
    """Resize the row arrays from (old, new) rows, from the driver before any worker writes. New rows must
    start at a shard boundary, so that each shard keeps one writer (rows of this writer are one shard each)."""
    for name, (old, new) in (
        ("frames/features", frame_rows),
        ("frames/feature_scales", frame_rows),
        (PSEUDO_DEPTH, frame_rows),
        ("clips/latents", clip_rows),
        ("clips/latent_scales", clip_rows),
    ):
        if name not in g:
            continue
        arr = g[name]
        block = (arr.shards or arr.chunks)[0]
        if old % block:
            raise StoreError(f"{name}: {block} rows per shard, so rows from {old} on would share a shard")
        if arr.shape[0] != new:
            arr.resize((new, *arr.shape[1:]))


def _write_metadata(
    g, index: ClipIndex, geometry: Geometry, basis: PCABasis, variants, channel_chunk: int, compression: str
) -> None:
    v = len(variants)
    basis.save(g.require_group("pca"), chunk_codecs(compression))
    create_row_arrays(g, geometry, len(index.frames) * v, len(index.clips) * v, channel_chunk, compression)
    _write_index_columns(g, index, variants, compression)


def _write_index_columns(g, index: ClipIndex, variants, compression: str) -> None:
    """The clip index's columns (frames/scene ... clips/feature_rows, small arrays the driver writes whole)
    and an all-false clips/valid that finalize sets."""
    v = len(variants)
    fg, cg = g.require_group("frames"), g.require_group("clips")
    columns = {
        "frames/scene": [s for s, _ in index.frames for _ in range(v)],
        "frames/index": np.array([f.index for _, f in index.frames for _ in range(v)], "int64"),
        "frames/timestamp": np.array([f.timestamp for _, f in index.frames for _ in range(v)], "float64"),
        "frames/path": [f.path for _, f in index.frames for _ in range(v)],
        "frames/variant": np.array([i for _ in index.frames for i in range(v)], "int8"),
        "clips/id": [c.clip_id + VARIANT_SUFFIX[var] for c in index.clips for var in variants],
        "clips/scene": [c.scene for c in index.clips for _ in variants],
        "clips/start": np.array([c.start for c in index.clips for _ in variants], "int64"),
        "clips/variant": np.array([i for _ in index.clips for i in range(v)], "int8"),
        "clips/timestamps": np.array([c.timestamps for c in index.clips for _ in variants], "float64"),
        "clips/feature_rows": np.array(
            [[r * v + i for r in c.feature_rows] for c in index.clips for i in range(v)], "int64"
        ),
    }
    for name, values in columns.items():
        group, key = (fg if name.startswith("frames/") else cg), name.split("/", 1)[1]
        write_column(group, key, values, compression)
    cg.create_array(
        "valid",
        shape=(len(index.clips) * v,),
        dtype="bool",
        fill_value=False,
        compressors=chunk_codecs(compression),
        config=ALL_CHUNKS,
        overwrite=True,
    )


STRING_COLUMNS = (
    "frames/scene",
    "frames/path",
    "clips/id",
    "clips/scene",
    "failures/clip_id",
    "failures/file",
    "failures/reason",
)


def create_row_arrays(
    g, geometry: Geometry, frame_rows: int, clip_rows: int, channel_chunk: int, compression: str
) -> None:
    """frames/features and clips/latents at full size (and the int8 option's scale arrays), empty."""
    h, w = geometry.feature_hw
    c = geometry.num_pca_channels
    comp, spec = chunk_codecs(compression), parse_compression(compression)
    fg, cg = g.require_group("frames"), g.require_group("clips")
    # one shard per frame (a frame is one object on disk), channel chunks inside it so that reading
    # the first c PCA channels touches about c/C of the bytes
    fg.create_array(
        "features",
        shape=(frame_rows, h, w, c),
        dtype=spec.dtype,
        chunks=(1, h, w, min(channel_chunk, c)),
        shards=(1, h, w, c),
        compressors=comp,
        fill_value=0,
        config=ALL_CHUNKS,
    )
    cg.create_array(
        "latents",
        shape=(clip_rows, *geometry.latents_shape),
        dtype=spec.dtype,
        chunks=(1, *geometry.latents_shape),
        compressors=comp,
        fill_value=0,
        config=ALL_CHUNKS,
    )
    if spec.lossy == "int8":  # one float32 scale per row and channel, a chunk per row (one writer each)
        fg.create_array(
            "feature_scales",
            shape=(frame_rows, c),
            dtype="float32",
            chunks=(1, c),
            compressors=comp,
            fill_value=0,
            config=ALL_CHUNKS,
        )
        cg.create_array(
            "latent_scales",
            shape=(clip_rows, geometry.latent_channels),
            dtype="float32",
            chunks=(1, geometry.latent_channels),
            compressors=comp,
            fill_value=0,
            config=ALL_CHUNKS,
        )


def pseudo_depth_entry(geometry: Geometry, scale: int, model: dict) -> dict:
    """The manifest's "pseudo_depth": where the maps are, what they hold, their size and the model that made them."""
    h, w = pseudo_depth_hw(geometry, scale)
    return {"array": PSEUDO_DEPTH, "target": PSEUDO_DEPTH_TARGET, "scale": scale, "shape": [h, w], "model": model}


def create_pseudo_depth(g, frame_rows: int, shape, compression: str) -> None:
    """frames/pseudo_depth [frame_rows, h, w] float16, a chunk per row (one writer each), lossless. Its fill
    value is NaN, not 0: a relative disparity map may be all zeros, a missing chunk must still read as damage."""
    g.require_group("frames").create_array(
        PSEUDO_DEPTH.split("/", 1)[1],
        shape=(frame_rows, *shape),
        dtype="float16",
        chunks=(1, *shape),
        compressors=chunk_codecs(compression),
        fill_value=float("nan"),
        config=ALL_CHUNKS,
    )


def write_column(group, name: str, values, compression: str) -> None:
    """A small array in one chunk; text as UTF-8 bytes in uint8 [n, width] (format.encode_strings)."""
    text = not isinstance(values, np.ndarray)
    a = encode_strings(values) if text else values
    arr = group.create_array(
        name,
        shape=a.shape,
        dtype=a.dtype,
        chunks=tuple(max(n, 1) for n in a.shape),
        compressors=chunk_codecs(compression),
        config=ALL_CHUNKS,
        overwrite=True,
    )
    if text:
        arr.attrs["encoding"] = "utf-8, zero-padded, uint8 [n, width]"
    if a.size:
        arr[...] = a


def write_failures(group, failures: list[dict], compression: str) -> None:
    failures = sorted(failures, key=lambda f: (f["clip_id"], f.get("file", "")))
    fg = group.require_group("failures")
    for key in ("clip_id", "file", "reason"):
        write_column(fg, key, [str(f.get(key, "")) for f in failures], compression)
