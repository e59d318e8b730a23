"""What a finished store tells readers that are not ours: xarray, zarr's consolidated open, pandas, DuckDB.

`publish` runs when a store is finished (finalize, copy), when a rollout adds its arrays, and on
`python -m jobs.store upgrade` for stores written before; it rewrites metadata only, never a chunk:
- every array's zarr.json gets Zarr v3 `dimension_names` (a text column's byte axis is named after the
  column, so that columns of different widths can share one xarray Dataset) and, under the attribute
  block `re2pix` (a namespaced convention with its own version, as OME-Zarr keeps `ome`), what it holds:
  a description, units, what its dtype means, and for the latents how `latent_norm` was applied;
- clips.parquet: the clip index as a table (tables.py), beside the arrays, which stay the source of truth;
- consolidated metadata in the root zarr.json, last. Zarr's tree walk warns once per non-Zarr entry of the
  store (README.md, card.json, clips.parquet, progress/); a consolidated open (zarr.open_group's and
  xarray's default) never walks, so it never warns. Our own reader never uses it (location.open_group):
  a rollout adds arrays after the store is finished, and consolidated metadata is stale until `publish`.
"""

from __future__ import annotations

import json
import warnings

CONVENTION = "re2pix"  # the attribute block's name, in every array's and group's attributes
CONVENTION_VERSION = "1.0"
TEXT = "UTF-8 bytes, zero-padded, one row per string (pipeline.store.format.decode_strings)"
FEATURES = "float16 PCA coefficients of standardized DINOv2 patch features, channels ordered by explained variance"

# array -> (dimension names, description, units, dtype meaning)
ARRAYS: dict[str, tuple[tuple[str, ...], str, str | None, str]] = {
    "frames/features": (
        ("frame_row", "y", "x", "pca_channel"),
        "DINOv2 features of each encoded frame on the patch grid, projected on the store's PCA basis (pca/)",
        None,
        FEATURES,
    ),
    "frames/feature_scales": (
        ("frame_row", "pca_channel"),
        "int8 option: frames/features holds round(value / scale) per frame row and channel",
        None,
        "float32 scale: value = stored int8 x scale",
    ),
    "frames/pseudo_depth": (
        ("frame_row", "depth_y", "depth_x"),
        "Depth Anything pseudo-depth of each encoded frame (manifest's pseudo_depth)",
        "relative inverse depth, up to scale and shift",
        "float16; NaN is the fill value (a missing chunk)",
    ),
    "frames/scene": (("frame_row", "scene_byte"), "scene of each frame row", None, TEXT),
    "frames/path": (("frame_row", "path_byte"), "source file of each frame row, under source_root", None, TEXT),
    "frames/index": (("frame_row",), "frame number within its scene", None, "int64"),
    "frames/timestamp": (("frame_row",), "time of the frame within its scene", "seconds", "float64"),
    "frames/variant": (("frame_row",), "cached variant: index into the manifest's variants", None, "int8"),
    "clips/latents": (
        ("clip_row", "latent_channel", "latent_frame", "latent_y", "latent_x"),
        "VAE posterior means of each clip row, normalized per channel: stored = (z - latent_norm.mean[c]) / "
        "latent_norm.std[c] (the root manifest's latent_norm); decode z = stored x std[c] + mean[c]",
        None,
        "float16 normalized latents",
    ),
    "clips/latent_scales": (
        ("clip_row", "latent_channel"),
        "int8 option: clips/latents holds round(value / scale) per clip row and channel",
        None,
        "float32 scale: value = stored int8 x scale",
    ),
    "clips/pred_features": (
        ("clip_row", "future_latent_frame", "y", "x", "pca_channel"),
        "Stage 1 rollouts of the future latent frames' features (attribute checkpoint_fingerprint)",
        None,
        FEATURES,
    ),
    "clips/id": (("clip_row", "id_byte"), "stable clip id; '-hflip' ends a flipped variant's", None, TEXT),
    "clips/scene": (("clip_row", "scene_byte"), "scene of each clip row", None, TEXT),
    "clips/start": (("clip_row",), "first frame number of the clip within its scene", None, "int64"),
    "clips/variant": (("clip_row",), "cached variant: index into the manifest's variants", None, "int8"),
    "clips/timestamps": (("clip_row", "clip_frame"), "time of each frame of the clip", "seconds", "float64"),
    "clips/feature_rows": (
        ("clip_row", "latent_frame"),
        "frame row (frames/) of each latent frame's features: frames 0, 4, ..., 24 of the clip",
        None,
        "int64 index",
    ),
    "clips/valid": (("clip_row",), "whether the clip row is usable (every variant encoded, no failure)", None, "bool"),
    "pca/mean": (("feature_dim",), "per-dimension mean subtracted before projection", None, "float32"),
    "pca/std": (("feature_dim",), "per-dimension std divided by before projection", None, "float32"),
    "pca/components": (("pca_channel", "feature_dim"), "components, by decreasing explained variance", None, "float32"),
    "pca/explained_variance": (("pca_channel",), "variance explained by each component", None, "float32"),
    "failures/clip_id": (("failure", "clip_id_byte"), "clip that failed to encode", None, TEXT),
    "failures/file": (("failure", "file_byte"), "the source file that failed", None, TEXT),
    "failures/reason": (("failure", "reason_byte"), "why it failed", None, TEXT),
}
# how the stored latents relate to the VAE's: machine-readable beside the description
LATENT_NORM = {
    "applied": "stored[c] = (z[c] - mean[c]) / std[c], z the VAE posterior mean",
    "inverse": "z[c] = stored[c] * std[c] + mean[c]",
    "values": "the root group's attribute latent_norm {mean, std}, one per latent_channel",
}
GROUPS = {
    "frames": "one row per encoded frame and variant; overlapping clips share frames",
    "clips": "one row per clip and variant (row = clip x variants + variant)",
    "pca": "the PCA basis: its fingerprint (manifest pca.fingerprint) decides which stores read together",
    "failures": "inputs that failed to encode, with their reason",
}


def array_attributes(name: str, ndim: int) -> tuple[list[str], dict]:
    """(dimension_names, the `re2pix` attribute block) of the array at `name` with `ndim` axes."""
    dims, description, units, dtype = ARRAYS.get(name, ((), f"array {name}", None, "see the store's card"))
    # an unknown array, or a text column of old stores (zarr `string`, 1-D): names that no other array shares
    dims = list(dims[:ndim]) if len(dims) >= ndim else [f"{name.replace('/', '_')}_{i}" for i in range(ndim)]
    block = {"version": CONVENTION_VERSION, "description": description, "dtype_meaning": dtype}
    if units:
        block["units"] = units
    if name == "clips/latents":
        block["latent_norm"] = LATENT_NORM
    return dims, block


def describe_arrays(fs, root: str) -> int:
    """Add dimension names and the `re2pix` block to every array's and group's zarr.json (chunks untouched);
    returns how many were rewritten."""
    from .location import write_atomic

    changed = 0
    for path in sorted(fs.glob(f"{root}/*/zarr.json") + fs.glob(f"{root}/*/*/zarr.json")):
        name = path[len(root) :].strip("/").removesuffix("/zarr.json")
        meta = json.loads(fs.cat_file(path))
        attrs = dict(meta.get("attributes") or {})
        if meta.get("node_type") == "array":
            dims, block = array_attributes(name, len(meta["shape"]))
            new = dict(meta, dimension_names=dims, attributes=dict(attrs, **{CONVENTION: block}))
        elif name in GROUPS:
            block = {"version": CONVENTION_VERSION, "description": GROUPS[name]}
            new = dict(meta, attributes=dict(attrs, **{CONVENTION: block}))
        else:
            continue
        if new != meta:  # an object store's PUT is whole or nothing already: no temporary copy to move
            data = json.dumps(new, indent=2).encode()
            if "file" in fs.protocol:
                write_atomic(fs, path, data)
            else:
                fs.pipe_file(path, data)
            changed += 1
    return changed


def consolidate(location: str, storage_options: dict | None = None) -> None:
    """Write consolidated metadata into the root zarr.json (zarr-python's layout)."""
    import zarr

    from .location import fsspec_store, is_url, writable_location

    location = writable_location(location)
    target = fsspec_store(location, storage_options, read_only=False) if is_url(location) else location
    with warnings.catch_warnings():  # the walk meets README.md, card.json, clips.parquet and progress/: ours
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(target, zarr_format=3)


def publish(location: str, storage_options: dict | None = None) -> dict:
    """Describe every array, write clips.parquet, consolidate: what a finished store shows other readers."""
    from .location import filesystem
    from .reader import Store
    from .tables import write_clip_table

    fs, root = filesystem(location, storage_options)
    described = describe_arrays(fs, root)
    rows = write_clip_table(Store(location, storage_options), fs, root)
    consolidate(location, storage_options)
    return {"arrays_described": described, "clip_table_rows": rows}
