"""A store's card: README.md (for a person, in a browser) and card.json (the same, for a program), written
into the store by `python -m jobs.store card STORE`, by `copy`, and by the writer's finalize (so the cache job).

It says what the store holds (counts; shape, dtype, codecs and bytes of every array), the encoders with their
weight ids and hashes, the PCA fingerprint, the clip geometry, the source dataset and its licence terms as the
adapter knows them, how the store was made, and how to read it.
"""

from __future__ import annotations

import importlib
import json
import shlex
import warnings

from .format import STRING_ENCODING
from .location import filesystem, write_atomic

CARD_MARK = "<!-- re2pix store card: written by `python -m jobs.store card`; rewritten on each card -->"
CARD_FILES = ("README.md", "card.json")


def licence_of(dataset: str | None) -> str:
    """The licence terms the dataset's adapter states (pipeline/sources/*: `licence`)."""
    from ..sources import SOURCES

    if dataset not in SOURCES:
        return f"unknown: dataset {dataset!r} has no adapter in this re2pix; ask whoever made the store"
    module, cls = SOURCES[dataset].split(":")
    return getattr(getattr(importlib.import_module(module), cls), "licence", None) or "not stated by the adapter"


def _arrays(group, prefix: str = ""):
    with warnings.catch_warnings():  # progress/ holds JSON markers, not Zarr nodes
        warnings.simplefilter("ignore")
        arrays, groups = sorted(group.arrays()), sorted(group.groups())
    for name, arr in arrays:
        yield f"{prefix}{name}", arr
    for name, sub in groups:
        yield from _arrays(sub, f"{prefix}{name}/")


def _codecs(arr) -> list[str]:
    meta = arr.metadata.to_dict()
    names = []
    for c in meta.get("codecs", []):
        names.append(c["name"])
        if c["name"] == "sharding_indexed":
            names += [f"inner:{i['name']}" for i in c.get("configuration", {}).get("codecs", [])]
    return names


def build_card(store) -> dict:
    """The card of an opened reader.Store, as a JSON-able dict."""
    fs, root = filesystem(store.location, store.storage_options)
    m = store.manifest
    arrays = {}
    for name, arr in _arrays(store.group):
        try:
            nbytes = int(fs.du(f"{root}/{name}"))
        except (OSError, NotImplementedError, ValueError):
            nbytes = None
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "codecs": _codecs(arr), "bytes": nbytes}
        if name in ("frames/scene", "frames/path", "clips/id", "clips/scene") or name.startswith("failures/"):
            if str(arr.dtype) == "uint8":
                arrays[name]["encoding"] = STRING_ENCODING
    codecs_needed = sorted({c.removeprefix("inner:") for a in arrays.values() for c in a["codecs"]})
    cache_config = m.get("cache_config")
    made_by = m.get("copied_from", {}).get("command") if isinstance(m.get("copied_from"), dict) else None
    if made_by is None and isinstance(cache_config, dict):
        made_by = "python -m jobs.cache " + " ".join(_flag(k, v) for k, v in sorted(cache_config.items()))
    counts = m.get("counts", {})
    return {
        "store": store.location,
        "format": f"{m.get('format')} v{m.get('format_version')}",
        "pipeline_version": m.get("pipeline_version"),
        "created": m.get("created"),
        "finished": m.get("finished"),
        "dataset": {
            "name": m.get("dataset"),
            "split": m.get("split"),
            "fps": m.get("fps"),
            "source_root": m.get("source_root"),
            "licence": licence_of(m.get("dataset")),
        },
        "holds": {
            "usable_clips": len(store),
            "indexed_clips": counts.get("clips"),
            "generation": m.get("generation", 0),  # appends it has had (StoreWriter._grow)
            "frames": counts.get("frames"),
            "failed_clips": counts.get("failed_clips", 0),
            "variants": store.variants,
            "pca_channels": store.num_channels,
            "pred_features": store.has_pred_features,
            "pseudo_depth": m.get("pseudo_depth"),
            "bytes": sum(a["bytes"] or 0 for a in arrays.values()),
        },
        "arrays": arrays,
        "codecs_needed": codecs_needed,
        "compression": m.get("compression"),
        "lossy": m.get("lossy"),
        "encoders": m.get("encoders", {}),
        "pca": m.get("pca", {}),
        "geometry": m.get("geometry", {}),
        "latent_norm": m.get("latent_norm", {}),
        "made_by": made_by,
        "copied_from": m.get("copied_from"),
    }


def _flag(k: str, v) -> str:
    flag = "--" + k.replace("_", "-")
    if isinstance(v, bool):
        return flag if v else f"--no-{k.replace('_', '-')}"
    return f"{flag} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}"


def render_markdown(card: dict) -> str:
    d, h, g = card["dataset"], card["holds"], card["geometry"]
    lines = [
        CARD_MARK,
        f"# re2pix feature store: {d['name']} / {d['split']}",
        "",
        f"`{card['store']}`: {card['format']}, written by re2pix {card['pipeline_version']} "
        f"({card['created']} .. {card['finished']}).",
        "",
        "## What it holds",
        "",
        f"- {h['usable_clips']} usable clips of {h['indexed_clips']} indexed ({h['failed_clips']} failed), "
        f"variants {', '.join(h['variants'])}; {h['frames']} feature frames shared by overlapping clips",
        f"- DINOv2 features in {h['pca_channels']} PCA channels, WAN2.1-VAE latents"
        + ("; Stage 1 rollouts (clips/pred_features)" if h["pred_features"] else "")
        + (
            f"; Depth Anything pseudo-depth, relative disparity at {h['pseudo_depth']['shape']} (frames/pseudo_depth)"
            if h.get("pseudo_depth")
            else ""
        ),
        f"- {h['bytes'] / 2**20:.1f} MiB in all; compression `{card['compression']}`"
        + (f" (lossy: {json.dumps(card['lossy'])})" if card["lossy"] else " (lossless)"),
        "",
        "| array | shape | dtype | codecs | bytes |",
        "|---|---|---|---|---|",
    ]
    for name, a in card["arrays"].items():
        dtype = a["dtype"] + (" (UTF-8 text)" if a.get("encoding") else "")
        lines.append(f"| {name} | {a['shape']} | {dtype} | {', '.join(a['codecs'])} | {a['bytes']} |")
    old_text = "vlen-utf8" in card["codecs_needed"]
    lines += [
        "",
        f"A Zarr v3 reader needs the codecs {', '.join(f'`{c}`' for c in card['codecs_needed'])}. "
        + (
            "Its text columns use zarr-python's `string` type (`vlen-utf8`, written before re2pix stored text "
            "as bytes), which tensorstore cannot read; `python -m jobs.store copy` rewrites them as UTF-8 "
            "bytes."
            if old_text
            else "Text columns are UTF-8 bytes, zero-padded, in uint8 [n, width] arrays: tensorstore's zarr3 "
            "driver reads every array."
        ),
        "",
        "## Source dataset and licence",
        "",
        f"- dataset `{d['name']}`, split `{d['split']}` at {d['fps']} fps, from `{d['source_root']}`",
        f"- licence terms (as the re2pix adapter knows them): {d['licence']}",
        "- the features and latents are derived from the dataset's frames: they carry its terms",
        "",
        "## Encoders, PCA basis, geometry",
        "",
    ]
    for name, e in sorted(card["encoders"].items()):
        lines.append(
            f"- {name}: `{e.get('weights_id')}` revision {e.get('revision')}, sha256 `{e.get('sha256')}`, "
            f"input {e.get('input_size')}" + (f", layers {e.get('layers')}" if e.get("layers") else "")
        )
    p = card["pca"]
    lines.append(
        f"- PCA: {p.get('num_components')} of {p.get('feature_dim')} dims, "
        f"fingerprint `{p.get('fingerprint')}`"
        + (
            f"; the first {p['num_components']} components of basis `{p['prefix_of']['fingerprint']}` "
            f"({p['prefix_of']['num_components']} components): reads together with stores of that basis "
            f"at <= {p['num_components']} channels"
            if isinstance(p.get("prefix_of"), dict)
            else ""
        )
    )
    lines.append(f"- geometry: {json.dumps(g)}")
    lines += [
        "",
        "## How it was made",
        "",
        f"    {card['made_by'] or '(not recorded)'}",
        "",
        "## How to read it",
        "",
        "```python",
        "from pipeline.store.reader import Store  # pip install re2pix (numpy, zarr, fsspec)",
        f"store = Store({card['store']!r})",
        "clip = store.read_clip(0, channels=min(256, store.num_channels))",
        "clip.features.shape, clip.latents.shape  # [7, H, W, c] and [16, 7, h, w], float16",
        "store.basis.unproject(clip.features)      # back to DINOv2 space (best rank-c estimate)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(location: str, storage_options: dict | None = None) -> dict:
    """Write README.md and card.json into a finished store; a README.md there that is not a card is kept
    (then only card.json is written). Returns the card."""
    from .reader import Store

    store = Store(location, storage_options)
    card = build_card(store)
    fs, root = filesystem(location, storage_options)
    readme = f"{root}/README.md"
    if fs.exists(readme) and not fs.cat_file(readme).startswith(CARD_MARK.encode()):
        print(f"{location}: README.md there is not a store card of ours: left as it is, card.json written")
    else:
        write_atomic(fs, readme, render_markdown(card).encode())
    write_atomic(fs, f"{root}/card.json", json.dumps(card, indent=1).encode())
    return card


def remove_card(fs, root: str) -> None:
    """Remove the card files of a store, never a README.md that a person wrote."""
    if fs.exists(f"{root}/card.json"):
        fs.rm(f"{root}/card.json")
    readme = f"{root}/README.md"
    if fs.exists(readme) and fs.cat_file(readme).startswith(CARD_MARK.encode()):
        fs.rm(readme)
