"""Dataset adapters, one module each, all behind `base.Source`.

`get_source(name, root, split, **options)` builds one by name; adapters register themselves in
`SOURCES` by module path so that importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import os

from .base import FrameRef, Source, SourceError

# name -> "module:Class"; each module is imported only when its source is asked for.
SOURCES = {
    "synthetic": "pipeline.sources.synthetic:SyntheticSource",
    "videos": "pipeline.sources.videos:VideoFolderSource",
    "nuscenes": "pipeline.sources.nuscenes:NuScenesSource",
    "cityscapes": "pipeline.sources.cityscapes:CityscapesSource",
    "kitti": "pipeline.sources.kitti:KittiSource",
    "covla": "pipeline.sources.covla:CovlaSource",
}


def get_source(name: str, root: str | None = None, split: str = "train", **options) -> Source:
    if name not in SOURCES:
        raise SourceError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    if root is not None and os.path.exists(root) and not os.path.isdir(root):
        raise SourceError(f"{name}: data root {root} is a file, not a folder")
    module, cls = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), cls)(root=root, split=split, **options)


__all__ = ["SOURCES", "FrameRef", "Source", "SourceError", "get_source"]
