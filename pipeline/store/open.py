"""Which format a training source is in: a Zarr store, or a WebDataset export of one (wds.py).

A WebDataset source is a shard path (`.tar`), a brace pattern (`shards/shard-{000000..000009}.tar`),
or a folder holding the export's `manifest.json` and no `zarr.json`. Everything else is read as a
Zarr store (whose reader says clearly when it is not one).
"""

from __future__ import annotations

from .format import StoreError

ZARR, WEBDATASET = "zarr", "webdataset"


def is_webdataset(location: str, storage_options: dict | None = None) -> bool:
    """A WebDataset export (shard paths, brace patterns, or a folder with manifest.json, no zarr.json)."""
    from .wds import reading_filesystem

    if location.endswith(".tar") or "{" in location:
        return True
    fs, root = reading_filesystem(location, storage_options)
    return not fs.exists(f"{root}/zarr.json") and fs.exists(f"{root}/manifest.json")


def source_format(sources: list[str], storage_options: dict | None = None) -> str:
    """ZARR or WEBDATASET for a list of sources read together; mixing the two is refused."""
    kinds = {WEBDATASET if is_webdataset(s, storage_options) else ZARR for s in sources}
    if len(kinds) > 1:
        raise StoreError(f"cannot mix Zarr stores and WebDataset shards in one stream: {sources}")
    return kinds.pop()


def expand_shards(location: str, storage_options: dict | None = None) -> tuple[str, list[str]]:
    """(folder holding manifest.json, shard URLs) of one WebDataset source."""
    from .wds import export_folder, shard_urls

    if location.endswith(".tar") or "{" in location:
        import braceexpand

        return export_folder(location), list(braceexpand.braceexpand(location))
    return location.rstrip("/"), shard_urls(location, storage_options)
