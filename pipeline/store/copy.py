"""`copy`: a store from any fsspec location to any other (local, s3://, gs://, hf://datasets/..., http(s) as a
source only), optionally keeping only the first C PCA channels and re-encoding with another compression spec.

The copy is a new store of the same format, made like the cache job makes one: every array is created at full
size first, rows are copied in work units of consecutive rows, each finished unit is one atomic marker under
progress/ (a killed copy reruns only the units without one), and the store is marked complete last. Each row is
verified as it goes: the source's crc32c and presence checks on read, then the row read back from the copy must
hash to the digest of what was written (recorded in the unit's marker, which `verify` checks later too).

A copy with fewer channels holds the basis's first C components and records, under `pca.prefix_of`, the basis
it is a prefix of: it stays compatible with its original (and other prefixes of it) for reading <= C channels.

Finished Stage 1 rollouts (clips/pred_features) travel too, cut to the same C channels and always lossless (as
the rollout job stores them), under the same checkpoint fingerprint; their units are recorded as the rollout
job records its chunks (progress/rollout-{fingerprint[:16]}/chunk-NNNNNN.json, with the rows' digests), so
`verify` checks them and a rollout rerun on the copy finds them done. Unfinished rollouts are not copied.
A store's pseudo-depth maps (frames/pseudo_depth, cache --pseudo-depth) travel too, lossless, in units of their own.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

import numpy as np

from .basis import PCABasis
from .format import PSEUDO_DEPTH, StoreError, decode_strings
from .location import is_url, open_group, same_location, write_atomic
from .lossy import parse_compression
from .reader import DECODE_ERRORS, Store
from .writer import (
    ALL_CHUNKS,
    StoreWriter,
    chunk_codecs,
    create_pseudo_depth,
    create_row_arrays,
    digest,
    existing_store,
    remove_store,
    write_column,
    write_failures,
)

_COLUMNS = (
    "frames/scene",
    "frames/index",
    "frames/timestamp",
    "frames/path",
    "frames/variant",
    "clips/id",
    "clips/scene",
    "clips/start",
    "clips/variant",
    "clips/timestamps",
    "clips/feature_rows",
)
_STRINGS = {"frames/scene", "frames/path", "clips/id", "clips/scene"}


def absolute_url(location: str) -> str:
    """A location another machine can be told: URLs as they are, local paths as absolute file:// URLs."""
    location = str(location)
    return location if is_url(location) else "file://" + os.path.abspath(location)


def refuse_self_copy(src: str, dst: str) -> None:
    if same_location(src, dst):
        raise StoreError(f"{dst} is the source store itself ({src}): copy it to another location")


def copy_store(
    src: str,
    dst: str,
    *,
    channels: int | None = None,
    compression: str | None = None,
    src_options: dict | None = None,
    dst_options: dict | None = None,
    rows_per_unit: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Copy the finished store `src` to `dst`; returns a summary (rows, bytes, units done now and before)."""
    from tqdm.auto import tqdm

    refuse_self_copy(src, dst)  # before anything is opened: --overwrite must never remove the source
    source = Store(src, src_options)
    c = source._channels(channels)
    spec = parse_compression(compression or source.manifest.get("compression", "blosc-zstd")).spec
    basis = source.basis if c == source.num_channels else source.basis.prefix(c)
    rollouts = source.pred_features_fingerprint if source.has_pred_features else None
    origin = {
        "store": absolute_url(src),
        "pca_fingerprint": source.pca_fingerprint,
        "channels": c,
        "compression": spec,
        "clip_index_digest": source.manifest.get("clip_index_digest"),
        "pred_features": rollouts,
        "command": command,
    }
    writer = _create_or_resume(source, dst, dst_options, basis, c, spec, origin, overwrite)
    predicted = _create_rollouts(source, writer, rollouts, c, rows_per_unit) if rollouts else 0

    valid = source.group["clips/valid"][...]
    frame_rows = np.unique(source._feature_rows[valid]).tolist()
    clip_rows = np.flatnonzero(valid).tolist()
    units = {
        f"copy-frames-{i // rows_per_unit:06d}": ("features", frame_rows[i : i + rows_per_unit])
        for i in range(0, len(frame_rows), rows_per_unit)
    }
    units |= {
        f"copy-clips-{i // rows_per_unit:06d}": ("latents", clip_rows[i : i + rows_per_unit])
        for i in range(0, len(clip_rows), rows_per_unit)
    }
    if source.has_pseudo_depth:
        units |= {
            f"copy-depth-{i // rows_per_unit:06d}": ("pseudo_depth", frame_rows[i : i + rows_per_unit])
            for i in range(0, len(frame_rows), rows_per_unit)
        }
    done = writer.done_units() & set(units)
    todo = [(unit, kind, rows) for unit, (kind, rows) in units.items() if unit not in done]
    # rollouts in chunks of rows, recorded as the rollout job records them (jobs/rollout.py)
    chunks = [clip_rows[i : i + rows_per_unit] for i in range(0, len(clip_rows), rows_per_unit)] if rollouts else []
    marks = f"{writer.root}/progress/rollout-{str(rollouts)[:16]}"
    chunks_done = _marked_chunks(writer, marks) if rollouts else set()
    todo += [(k, "pred_features", rows) for k, rows in enumerate(chunks) if k not in chunks_done]
    h, w = source.geometry.feature_hw
    row_bytes = {
        "features": h * w * c * 2,
        "latents": int(np.prod(source.geometry.latents_shape)) * 2,
        "pred_features": source.geometry.future_latents * h * w * c * 2,
        "pseudo_depth": int(np.prod(source.group[PSEUDO_DEPTH].shape[1:])) * 2 if source.has_pseudo_depth else 0,
    }
    total = sum(row_bytes[kind] * len(rows) for _, kind, rows in todo)
    with tqdm(
        total=total, desc=f"copy -> {dst}", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    ) as bar:
        for unit, kind, rows in todo:
            digests = {}
            for r in rows:
                key = str(r) if kind == "pred_features" else f"{kind}/{r}"
                digests[key] = _copy_row(source, writer, kind, int(r), c, predicted)
                bar.update(row_bytes[kind])
            if kind == "pred_features":  # the rollout job's chunk record
                record = {"chunk": unit, "fingerprint": rollouts, "rows": sorted(map(int, rows)), "digests": digests}
                write_atomic(writer.fs, f"{marks}/chunk-{unit:06d}.json", json.dumps(record, sort_keys=True).encode())
                continue
            writer.mark_unit_done(
                unit,
                clip_rows=rows if kind == "latents" else (),
                frame_rows=rows if kind in ("features", "pseudo_depth") else (),
                digests=digests,
            )
    records = [r for r in writer.unit_records() if r["unit"] in units]
    missing = set(units) - {r["unit"] for r in records}
    if missing:  # not reached unless markers vanished under us
        raise StoreError(f"{dst}: {len(missing)} copy units have no marker (e.g. {sorted(missing)[:3]}); rerun")
    if rollouts:
        left = set(range(len(chunks))) - _marked_chunks(writer, marks)
        if left:  # not reached unless markers vanished under us
            raise StoreError(f"{dst}: rollout chunks {sorted(left)[:3]} have no marker; rerun")
        writer.finish_pred_features()
    writer.group["clips/valid"][...] = valid
    write_failures(writer.group, source.failures(), spec)
    writer.mark_complete(dict(source.manifest["counts"], done_units=len(records)))
    return {
        "source": src,
        "store": dst,
        "channels": c,
        "compression": spec,
        "units": len(units) + len(chunks),
        "units_resumed": len(done) + len(chunks_done),
        "frame_rows": len(frame_rows),
        "clip_rows": len(clip_rows),
        "pred_features": rollouts,
        "bytes_copied": total,
    }


def _copy_row(source: Store, writer: StoreWriter, kind: str, row: int, c: int, predicted: int) -> str:
    """Read one row from the source (crc32c, presence), write it, read it back: the digest of what is stored.
    predicted: the channels a rollout row holds (the rest are zero by design)."""
    if kind == "features":
        name, a = "frames/features", source.read_feature_row(row, c)
        source._check_present(a, name, row)
        want = writer.write_features(row, a)
    elif kind == "latents":
        name, a = "clips/latents", source.read_latent_row(row)
        source._check_present(a, name, row)
        want = writer.write_latents(row, a)
    elif kind == "pseudo_depth":  # its reader refuses NaN, its missing chunk
        name, a = PSEUDO_DEPTH, source.read_pseudo_depth_row(row)
        want = writer.write_pseudo_depth(row, a)
    else:  # Stage 1 rollouts: float16, lossless whatever the spec
        name = "clips/pred_features"
        a = source._read_row(source.group[name], name, row, (slice(None), slice(None), slice(None), slice(0, c)))
        for frame in a:
            source._check_present(frame[..., :predicted], name, row)
        writer.write_pred_features(row, a)
        want = digest(a)
    try:
        back = writer.group[name][row]
    except DECODE_ERRORS as e:
        raise StoreError(f"{writer.location}: {name}[{row}] cannot be read back after writing it ({e})") from e
    if digest(back) != want:
        raise StoreError(
            f"{writer.location}: {name}[{row}] read back differs from what was written: the "
            "destination does not keep what it is given; the copy stops here"
        )
    return want


def _marked_chunks(writer: StoreWriter, marks: str) -> set[int]:
    return {int(p.rsplit("chunk-", 1)[-1][: -len(".json")]) for p in writer.fs.glob(f"{marks}/chunk-*.json")}


def _create_rollouts(source: Store, writer: StoreWriter, fingerprint: str, c: int, rows_per_unit: int) -> int:
    """clips/pred_features in the copy (or the one a killed copy made); the channels its rows predict."""
    predicted = min(c, int(source.group["clips/pred_features"].attrs.get("channels", source.num_channels)))
    arr = writer.create_pred_features(fingerprint)
    arr.attrs.update({"channels": predicted, "chunk_rows": rows_per_unit})
    return predicted


def _create_or_resume(
    source: Store, dst: str, options: dict | None, basis: PCABasis, c: int, spec: str, origin: dict, overwrite: bool
) -> StoreWriter:
    existing = existing_store(dst, options)
    if existing is not None:
        if existing.get("complete") and not overwrite:
            raise StoreError(f"{dst} is already a finished store; pass --overwrite to replace it")
        theirs = existing.get("copied_from") or {}
        same = all(
            theirs.get(k) == origin[k]
            for k in ("store", "pca_fingerprint", "channels", "compression", "clip_index_digest", "pred_features")
        )
        if not existing.get("complete") and same and not overwrite:
            return StoreWriter(dst, options)  # a killed copy of the same source and settings: resume it
        if not overwrite:
            raise StoreError(
                f"{dst} is an unfinished store made otherwise (not this copy of {origin['store']} "
                f"at {c} channels, {spec}); pass --overwrite to start again"
            )
        remove_store(dst, options)

    m = {k: v for k, v in source.manifest.items() if k not in ("complete", "finished", "lossy", "copied_from")}
    pca = {"fingerprint": basis.fingerprint, "num_components": c, "feature_dim": basis.feature_dim}
    if c < source.num_channels or "prefix_of" in source.manifest["pca"]:
        pca["prefix_of"] = source.manifest["pca"].get("prefix_of") or {
            "fingerprint": source.pca_fingerprint,
            "num_components": source.num_channels,
        }
    lossy = parse_compression(spec).manifest_entry()
    m.update(
        {
            "geometry": dict(source.manifest["geometry"], num_pca_channels=c),
            "pca": pca,
            "compression": spec,
            "channel_chunk": min(int(source.manifest.get("channel_chunk") or c), c),
            "copied_from": origin,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            **({"lossy": lossy} if lossy else {}),
        }
    )
    counts = dict(m["counts"])
    counts.pop("done_units", None)
    m["counts"] = counts

    g = open_group(dst, mode="a", storage_options=options)
    basis.save(g.require_group("pca"), chunk_codecs(spec))
    from .geometry import Geometry

    v = len(source.variants)
    create_row_arrays(
        g, Geometry.from_dict(m["geometry"]), counts["frames"] * v, counts["clips"] * v, m["channel_chunk"], spec
    )
    if source.has_pseudo_depth:
        create_pseudo_depth(g, counts["frames"] * v, source.group[PSEUDO_DEPTH].shape[1:], spec)  # checked at open
    for name in _COLUMNS:
        values = source._read_small(source.group[name], name)
        group, key = g.require_group(name.split("/")[0]), name.split("/", 1)[1]
        write_column(group, key, list(decode_strings(values)) if name in _STRINGS else values, spec)
    g.require_group("clips").create_array(
        "valid",
        shape=(counts["clips"] * v,),
        dtype="bool",
        fill_value=False,
        compressors=chunk_codecs(spec),
        config=ALL_CHUNKS,
    )
    g.attrs.update(m)
    return StoreWriter(dst, options)
