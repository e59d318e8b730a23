"""clips.parquet: the clip index of a store as a table that pandas, DuckDB or Spark read without zarr.

One row per clip row (clip x variants + variant), usable or not: row, id, scene, variant, start, timestamps
(seconds), valid, feature_rows (into frames/) and source_path (the clip's first frame, under the manifest's
source_root). The Zarr arrays stay the source of truth: `publish` rewrites the table from them and `verify`
checks that the two agree. Beside it, records of some of a store's clips: `held_out_record` (a run's
held-out scenes) and `clip_forecastability` (the synthetic source's forecastable share per clip).
"""

from __future__ import annotations

import io

import numpy as np

CLIP_TABLE = "clips.parquet"


def clip_table(store) -> dict[str, list]:
    """The table's columns, from the store's arrays (what the reader serves)."""
    from .format import decode_strings

    t = store.clip_table
    rows = len(t["id"])
    variants = store.group["clips/variant"][...] if "clips/variant" in store.group else np.zeros(rows, np.int8)
    paths = decode_strings(store.group["frames/path"][...])
    return {
        "row": list(range(rows)),
        "id": [str(x) for x in t["id"]],
        "scene": [str(x) for x in t["scene"]],
        "variant": [store.variants[int(v)] for v in variants],
        "start": t["start"].astype(np.int64).tolist(),
        "timestamps": t["timestamps"].astype(np.float64).tolist(),
        "valid": store.group["clips/valid"][...].astype(bool).tolist(),
        "feature_rows": store._feature_rows.astype(np.int64).tolist(),
        "source_path": [str(paths[r[0]]) for r in store._feature_rows],
    }


def held_out_record(store, held) -> dict:
    """The clips `held` of `store` and their scenes, checked by clip id when read back: what a training run
    writes of the scenes it held out (RUN_DIR/val_scenes.json) and `jobs.evaluate --val-scenes` reads."""
    metas = [store.clip_meta(int(i)) for i in held]
    return {
        "store": store.location,
        "scenes": sorted({m["scene"] for m in metas}),
        "clips": [int(i) for i in held],
        "clip_ids": [store.clip_ids[int(i)] for i in held],
    }


def clip_forecastability(store) -> dict[str, list] | None:
    """Per clip row, how much of its future frames its context shows, from the source the store was cached
    from, reopened here (Source.forecastability; the synthetic source's, under its recorded generator):
    {"forecastable_share": [float], "entries": [[object name]]}. None where that source cannot be reopened
    here or cannot say. Not a column of clips.parquet: that table holds only what the arrays hold."""
    from pipeline.sources.reopen import reopen_source

    source, _ = reopen_source(store.manifest)
    if source is None:
        return None
    g, t = store.geometry, store.clip_table
    keys = [(str(scene), int(start)) for scene, start in zip(t["scene"], t["start"])]
    labels = {}
    for scene, start in dict.fromkeys(keys):  # once per clip: its flip variants share its labels
        frames = source.frames(scene)[start : start + g.clip_frames]
        labels[scene, start] = source.forecastability(scene, frames, g.context_frames)
        if labels[scene, start] is None:
            return None
    return {name: [labels[key][name] for key in keys] for name in ("forecastable_share", "entries")}


def write_clip_table(store, fs, root: str) -> int:
    """Write clips.parquet into the store (atomically); returns its number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .location import write_atomic

    columns = clip_table(store)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    write_atomic(fs, f"{root}/{CLIP_TABLE}", buf.getvalue())
    return len(columns["row"])


def clip_table_problems(store) -> list[dict]:
    """Where clips.parquet disagrees with the arrays (nothing for a store written before the table)."""
    from .location import filesystem

    fs, root = filesystem(store.location, store.storage_options)
    path = f"{root}/{CLIP_TABLE}"
    if not fs.exists(path):
        return []
    import pyarrow.parquet as pq

    try:
        got = pq.read_table(io.BytesIO(fs.cat_file(path))).to_pydict()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return [{"array": CLIP_TABLE, "row": None, "reason": f"unreadable ({type(e).__name__}: {e})"}]
    want = clip_table(store)
    bad = []
    for name, values in want.items():
        theirs = got.get(name)
        if theirs is None:
            bad.append({"array": CLIP_TABLE, "row": None, "reason": f"column {name} is missing"})
        elif theirs != values:
            first = next((i for i, (a, b) in enumerate(zip(theirs, values)) if a != b), min(len(theirs), len(values)))
            bad.append(
                {
                    "array": CLIP_TABLE,
                    "row": first,
                    "reason": f"column {name} differs from the Zarr arrays (run `python -m jobs.store upgrade`)",
                }
            )
    return bad
