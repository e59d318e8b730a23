"""The labels of a clip's annotated frame for the semantic evaluation: segmentation trainIds and depth,
from folders the user gives ({clip_id}.png, {clip_id}.npy) or, for a Cityscapes store, from the gtFine
annotations beside its source frames (pipeline/sources/cityscapes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Labels:
    """Segmentation (trainIds, 255 ignored) and depth labels of a clip's annotated frame, or None."""

    def __init__(self, manifest: dict, annotated_frame: int, seg_dir=None, depth_dir=None):
        from pipeline.sources.cityscapes import gtfine_root

        self.seg_dir = Path(seg_dir) if seg_dir else None
        self.depth_dir = Path(depth_dir) if depth_dir else None
        self.cityscapes = None
        if manifest.get("dataset") == "cityscapes" and not self.seg_dir and manifest.get("source_root"):
            self.cityscapes = gtfine_root(manifest["source_root"], manifest.get("split", "val"))
        self.annotated = annotated_frame

    @property
    def has_seg(self) -> bool:
        return self.seg_dir is not None or self.cityscapes is not None

    @property
    def has_depth(self) -> bool:
        return self.depth_dir is not None

    def seg(self, clip_id: str, meta: dict) -> np.ndarray | None:
        from PIL import Image

        from pipeline.sources.cityscapes import gtfine_train_ids

        if self.seg_dir is not None:
            path = self.seg_dir / f"{clip_id}.png"
            return np.asarray(Image.open(path)) if path.exists() else None
        return gtfine_train_ids(self.cityscapes, meta["scene"], int(meta["start"]) + self.annotated)

    def depth(self, clip_id: str) -> np.ndarray | None:
        path = self.depth_dir / f"{clip_id}.npy" if self.depth_dir else None
        return np.load(path).astype(np.float32) if path is not None and path.exists() else None
