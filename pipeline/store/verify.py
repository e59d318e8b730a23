"""`verify`: read every row a finished store says it holds and report each one that is not what was written.

Checked, whether or not a progress marker still lists the row: every latents row of a usable clip and
every feature frame such a clip uses (and every row a marker recorded), every Stage 1 rollout row when
the store has them; each must decode (crc32c, codec, shard index), have all its chunks on disk (none
reading as fill values), hold only finite numbers, and hash to the digest its work unit recorded where
one was. clips.parquet, where the store has one, must equal the clip index. The PCA basis must have the
geometry's shapes and hash to the manifest's fingerprint. A store cached
with --pseudo-depth has its map of each such frame checked alike (a missing chunk of it reads as NaN).
A problem is a bad row: (array, row, reason); rows are never skipped because an earlier one failed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from .basis import BASIS_ARRAYS, PCABasis
from .format import DECODE_ERRORS, PSEUDO_DEPTH, DamagedStoreError, decode_reason, digest
from .location import filesystem
from .tables import clip_table_problems

if TYPE_CHECKING:  # Store.verify calls verify_store: the reader imports this module, not the other way round
    from .reader import Store

# a unit marker's digest keys are "<kind>/<row>"
DIGEST_KINDS = {"features": "frames/features", "latents": "clips/latents", "pseudo_depth": PSEUDO_DEPTH}
DIGEST_DIFFERS = "differs from the digest recorded when it was written"


def verify_store(store: Store, progress: bool = False) -> dict:
    """A report: {"store", "ok", "bad_rows": [{"array", "row", "reason"}], "checked": {array: rows},
    "nonfinite": {array: values}, "rows_without_digest": n}."""
    bad: list[dict] = []
    checked: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    _verify_basis(store, bad)
    bad += clip_table_problems(store)

    digests: dict[tuple[str, int], str] = {}
    fs, root = filesystem(store.location, store.storage_options)
    for path in sorted(fs.glob(f"{root}/progress/*.json")):
        try:
            for key, want in json.loads(fs.cat_file(path)).get("digests", {}).items():
                kind, row = key.split("/")
                digests[(DIGEST_KINDS[kind], int(row))] = want
        except (ValueError, AttributeError, OSError, KeyError) as e:
            bad.append(
                {
                    "array": f"progress/{path.rsplit('/', 1)[-1]}",
                    "row": None,
                    "reason": f"unreadable marker ({type(e).__name__}: {e})",
                }
            )
    valid = store.group["clips/valid"][...]
    clip_rows = set(np.flatnonzero(valid).tolist())
    frame_rows = set(np.unique(store._feature_rows[valid]).tolist())
    rows = {
        "frames/features": frame_rows | {r for a, r in digests if a == "frames/features"},
        "clips/latents": clip_rows | {r for a, r in digests if a == "clips/latents"},
    }
    if store.has_pseudo_depth:
        rows[PSEUDO_DEPTH] = frame_rows | {r for a, r in digests if a == PSEUDO_DEPTH}
    if store.pred_features_fingerprint is not None:
        rows["clips/pred_features"] = clip_rows
        digests.update(_rollout_digests(store))

    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(r) for r in rows.values()), desc=f"verify {store.location}", unit="row", disable=not progress
    )
    undigested = 0
    for name, wanted in rows.items():
        for row, a in store.check_rows(name, sorted(wanted)):
            bar.update(1)
            checked[name] = checked.get(name, 0) + 1
            if isinstance(a, DamagedStoreError):
                bad.append({"array": name, "row": row, "reason": a.reason})
                continue
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                nonfinite[name] = nonfinite.get(name, 0) + n
                bad.append({"array": name, "row": row, "reason": f"{n} NaN/Inf values"})
            want = digests.get((name, row))
            if want is None:
                undigested += 1
            elif digest(a) != want:
                bad.append({"array": name, "row": row, "reason": DIGEST_DIFFERS})
    bar.close()
    return {
        "store": store.location,
        "ok": not bad,
        "bad_rows": bad,
        "checked": checked,
        "nonfinite": nonfinite,
        "rows_without_digest": undigested,
    }


def basis_problems(store: Store) -> list[dict]:
    """What is wrong with a store's PCA basis: shapes against the geometry, its hash against the manifest."""
    bad: list[dict] = []
    _verify_basis(store, bad)
    return bad


def _verify_basis(store: Store, bad: list[dict]) -> None:
    g, want = store.geometry, store.pca_fingerprint
    shapes = {
        "mean": (g.feature_dim,),
        "std": (g.feature_dim,),
        "components": (g.num_pca_channels, g.feature_dim),
        "explained_variance": (g.num_pca_channels,),
    }
    if "pca" not in store.group:
        bad.append({"array": "pca", "row": None, "reason": "the PCA basis is missing"})
        return
    group = store.group["pca"]
    arrays = {}
    for name in BASIS_ARRAYS:
        if name not in group:
            bad.append({"array": f"pca/{name}", "row": None, "reason": "missing"})
            continue
        if tuple(group[name].shape) != shapes[name]:
            bad.append(
                {
                    "array": f"pca/{name}",
                    "row": None,
                    "reason": f"shape {list(group[name].shape)}, the geometry says {list(shapes[name])}",
                }
            )
            continue
        try:
            arrays[name] = np.asarray(group[name][...], np.float32)
        except DECODE_ERRORS as e:
            bad.append({"array": f"pca/{name}", "row": None, "reason": decode_reason(e)})
    if len(arrays) < len(BASIS_ARRAYS):
        return
    try:
        got = PCABasis(**arrays).fingerprint
    except ValueError as e:
        bad.append({"array": "pca", "row": None, "reason": str(e)})
        return
    if got != want:
        bad.append(
            {
                "array": "pca",
                "row": None,
                "reason": f"its arrays hash to {got[:12]}, the manifest's "
                f"fingerprint is {str(want)[:12]}: the basis was changed or swapped",
            }
        )


def _rollout_digests(store: Store) -> dict[tuple[str, int], str]:
    fs, root = filesystem(store.location, store.storage_options)
    fp = str(store.pred_features_fingerprint)
    out = {}
    for p in sorted(fs.glob(f"{root}/progress/rollout-{fp[:16]}/chunk-*.json")):
        for row, want in json.loads(fs.cat_file(p)).get("digests", {}).items():
            out[("clips/pred_features", int(row))] = want
    return out
