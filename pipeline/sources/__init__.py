"""Dataset adapters, one module each, all behind `base.Source`.

`get_source(name, root, split, **options)` builds one by name; adapters register themselves in
`SOURCES` by module path so that importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
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
    cls = getattr(importlib.import_module(module), cls)
    _check_options(name, cls, options)
    try:
        return cls(root=root, split=split, **options)
    except ValueError as e:  # an adapter refusing an option's value
        raise SourceError(f"{name}: {e}" if not str(e).startswith(name) else str(e)) from None


def _check_options(name: str, cls, options: dict) -> None:
    """--source-options' keys are the adapter's parameters, each of its default's type (an int for a float)."""
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if k not in ("self", "root", "split")}
    for key, value in options.items():
        if key not in params:
            raise SourceError(f"{name}: unknown source option {key!r}; known: {', '.join(params)}")
        default = params[key].default
        kind = float if isinstance(default, float) else type(default)
        if default is None or default is inspect.Parameter.empty or kind not in (int, float, str, bool, tuple):
            continue
        ok = isinstance(value, list | tuple) if kind is tuple else isinstance(value, kind)
        ok = ok or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise SourceError(f"{name}: source option {key!r} must be a {kind.__name__}, got {value!r}")


__all__ = ["SOURCES", "FrameRef", "Source", "SourceError", "get_source"]
