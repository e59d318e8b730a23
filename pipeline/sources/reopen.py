"""Reopening the source a store was cached from, from what its manifest records (dataset, split,
source_root and the adapter's options: the synthetic generator's settings under "generator", else the
cache job's --source-options). A source_root must be an existing path here, or builtin."""

from __future__ import annotations

from pathlib import Path

from . import SOURCES, Source, get_source


def reopen_source(manifest: dict) -> tuple[Source | None, str | None]:
    """(the store's source, None), or (None, why it cannot be reopened here)."""
    dataset, split, root = manifest.get("dataset"), manifest.get("split"), manifest.get("source_root")
    if dataset not in SOURCES or not split:
        return None, f"dataset {dataset!r} is not a known source"
    root = None if not root or str(root).startswith("builtin:") else str(root)
    if root is not None and not Path(root).exists():
        return None, f"source_root {root} does not exist here"
    options = dict((manifest.get("cache_config") or {}).get("source_options") or {})
    options.update(manifest.get("generator") or {})  # what the adapter says it was built with
    try:
        return get_source(dataset, root, split, **options), None
    except Exception as e:  # noqa: BLE001 - any failure just means: no source frames
        return None, f"cannot open {dataset} at {root}: {type(e).__name__}: {e}"
