"""`copy`: a store from any fsspec location to any other (local, s3://, gs://, hf://datasets/..., http(s) as a
source only), optionally keeping only the first C PCA channels and re-encoding with another compression spec.

The copy is a new store of the same format, made like the cache job makes one: every array is created at full
size first, rows are copied in work units of consecutive rows, each finished unit is one atomic marker under
progress/ (a killed copy reruns only the units without one), and the store is marked complete last. Each row is
verified as it goes: the source's crc32c and presence checks on read, then the row read back from the copy must
hash to the digest of what was written (recorded in the unit's marker, which `verify` checks later too).

A copy with fewer channels holds the basis's first C components and records, under `pca.prefix_of`, the basis
it is a prefix of: it stays compatible with its original (and other prefixes of it) for reading <= C channels.
"""

from __future__ import annotations

import datetime as _dt
import os

import numpy as np

from .basis import PCABasis
from .format import StoreError, decode_strings
from .location import is_url, open_group
from .lossy import parse_compression
from .reader import DECODE_ERRORS, Store
from .writer import (
    ALL_CHUNKS,
    StoreWriter,
    chunk_codecs,
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

    source = Store(src, src_options)
    c = source._channels(channels)
    spec = parse_compression(compression or source.manifest.get("compression", "blosc-zstd")).spec
    basis = source.basis if c == source.num_channels else source.basis.prefix(c)
    origin = {
        "store": absolute_url(src),
        "pca_fingerprint": source.pca_fingerprint,
        "channels": c,
        "compression": spec,
        "clip_index_digest": source.manifest.get("clip_index_digest"),
        "command": command,
    }
    writer = _create_or_resume(source, dst, dst_options, basis, c, spec, origin, overwrite)

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
    done = writer.done_units() & set(units)
    h, w = source.geometry.feature_hw
    row_bytes = {"features": h * w * c * 2, "latents": int(np.prod(source.geometry.latents_shape)) * 2}
    todo = {u: v for u, v in units.items() if u not in done}
    total = sum(row_bytes[kind] * len(rows) for kind, rows in todo.values())
    with tqdm(
        total=total, desc=f"copy -> {dst}", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    ) as bar:
        for unit, (kind, rows) in todo.items():
            digests = {}
            for r in rows:
                digests[f"{kind}/{r}"] = _copy_row(source, writer, kind, int(r), c)
                bar.update(row_bytes[kind])
            writer.mark_unit_done(
                unit,
                clip_rows=rows if kind == "latents" else (),
                frame_rows=rows if kind == "features" else (),
                digests=digests,
            )
    records = [r for r in writer.unit_records() if r["unit"] in units]
    missing = set(units) - {r["unit"] for r in records}
    if missing:  # not reached unless markers vanished under us
        raise StoreError(f"{dst}: {len(missing)} copy units have no marker (e.g. {sorted(missing)[:3]}); rerun")
    writer.group["clips/valid"][...] = valid
    write_failures(writer.group, source.failures(), spec)
    writer.mark_complete(dict(source.manifest["counts"], done_units=len(records)))
    return {
        "source": src,
        "store": dst,
        "channels": c,
        "compression": spec,
        "units": len(units),
        "units_resumed": len(done),
        "frame_rows": len(frame_rows),
        "clip_rows": len(clip_rows),
        "bytes_copied": total,
    }


def _copy_row(source: Store, writer: StoreWriter, kind: str, row: int, c: int) -> str:
    """Read one row from the source (crc32c, presence), write it, read it back: the digest of what is stored."""
    if kind == "features":
        a = source.read_feature_row(row, c)
        source._check_present(a, "frames/features", row)
        want = writer.write_features(row, a)
        name = "frames/features"
    else:
        a = source.read_latent_row(row)
        source._check_present(a, "clips/latents", row)
        want = writer.write_latents(row, a)
        name = "clips/latents"
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
            for k in ("store", "pca_fingerprint", "channels", "compression", "clip_index_digest")
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
