"""The labels of a clip's annotated frame for the semantic evaluation: segmentation trainIds and depth,
from folders the user gives ({clip_id}.png, {clip_id}.npy), from the store's own source when it renders
ground truth (`source`: the synthetic set's class maps and depth, `Source.read_targets`) or, for a
Cityscapes store, from the gtFine annotations beside its source frames (pipeline/sources/cityscapes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Labels:
    """Segmentation (trainIds, 255 ignored) and depth labels of a clip's annotated frame, or None."""

    def __init__(self, manifest: dict, annotated_frame: int, seg_dir=None, depth_dir=None):
        from pipeline.sources.cityscapes import gtfine_root

        self.source = None
        if SOURCE in (seg_dir, depth_dir):
            self.source = _rendering_source(manifest)
        self.seg_from_source, self.depth_from_source = seg_dir == SOURCE, depth_dir == SOURCE
        self.seg_dir = Path(seg_dir) if seg_dir and seg_dir != SOURCE else None
        self.depth_dir = Path(depth_dir) if depth_dir and depth_dir != SOURCE else None
        self.cityscapes = None
        if manifest.get("dataset") == "cityscapes" and not self.seg_dir and manifest.get("source_root"):
            self.cityscapes = gtfine_root(manifest["source_root"], manifest.get("split", "val"))
        self.annotated = annotated_frame

    @property
    def has_seg(self) -> bool:
        return self.seg_dir is not None or self.cityscapes is not None or self.seg_from_source

    @property
    def has_depth(self) -> bool:
        return self.depth_dir is not None or self.depth_from_source

    @property
    def moving(self) -> tuple[int, ...]:
        """The class ids that move (mIoU "moving"): the source's own, else Cityscapes' trainIds 11-18."""
        if self.source is not None:
            return tuple(self.source.target_classes()["moving"])
        from .dpt import MOVING_CLASSES

        return MOVING_CLASSES

    def _targets(self, meta: dict) -> dict:
        refs = {f.index: f for f in self.source.frames(meta["scene"])}
        return self.source.read_targets(meta["scene"], refs[int(meta["start"]) + self.annotated])

    def seg(self, clip_id: str, meta: dict) -> np.ndarray | None:
        from PIL import Image

        from pipeline.sources.cityscapes import gtfine_train_ids

        if self.seg_from_source:
            return self._targets(meta)["classes"]
        if self.seg_dir is not None:
            path = self.seg_dir / f"{clip_id}.png"
            return np.asarray(Image.open(path)) if path.exists() else None
        return gtfine_train_ids(self.cityscapes, meta["scene"], int(meta["start"]) + self.annotated)

    def depth(self, clip_id: str, meta: dict | None = None) -> np.ndarray | None:
        if self.depth_from_source:
            return self._targets(meta)["depth"]
        path = self.depth_dir / f"{clip_id}.npy" if self.depth_dir else None
        return np.load(path).astype(np.float32) if path is not None and path.exists() else None


SOURCE = "source"  # --labels source / --depth-labels source: the store's own source renders them


def _rendering_source(manifest: dict):
    """The store's source, reopened, when it renders ground truth; else an InferenceError saying why."""
    from pipeline.sources.reopen import reopen_source

    from . import InferenceError

    source, why = reopen_source(manifest)
    if source is None:
        raise InferenceError(f"labels from the source: {why}")
    if not (source.target_classes() or {}).get("names"):
        raise InferenceError(f"labels from the source: {manifest.get('dataset')} renders no ground truth")
    return source
