"""The labels of a clip's annotated frame for the semantic evaluation: segmentation trainIds and depth,
from folders the user gives ({clip_id}.png, {clip_id}.npy), from the store's own source when it renders
ground truth (`source`: the synthetic set's class maps and depth, `Source.read_targets`) or, for a
Cityscapes store, from the gtFine annotations beside its source frames (pipeline/sources/cityscapes.py).
Depth also from the store's own pseudo-depth (`pseudo-depth`: frames/pseudo_depth, cache --pseudo-depth),
per-frame normalized as the depth head trained on it (jobs/train_dpt.py) predicts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Labels:
    """Segmentation (trainIds, 255 ignored) and depth labels of a clip's annotated frame, or None."""

    def __init__(self, manifest: dict, annotated_frame: int, seg_dir=None, depth_dir=None, store=None):
        """`store` (a reader.Store, the one `manifest` is of): needed for depth_dir "pseudo-depth" only."""
        from pipeline.sources.cityscapes import gtfine_root

        self.source = None
        if SOURCE in (seg_dir, depth_dir):
            self.source = _rendering_source(manifest)
        self.seg_from_source, self.depth_from_source = seg_dir == SOURCE, depth_dir == SOURCE
        self.seg_dir = Path(seg_dir) if seg_dir and seg_dir != SOURCE else None
        self.depth_dir = Path(depth_dir) if depth_dir and depth_dir not in (SOURCE, PSEUDO_DEPTH) else None
        self.pseudo_depth = _PseudoDepth(store, annotated_frame) if depth_dir == PSEUDO_DEPTH else None
        self.cityscapes = None
        if manifest.get("dataset") == "cityscapes" and not self.seg_dir and manifest.get("source_root"):
            self.cityscapes = gtfine_root(manifest["source_root"], manifest.get("split", "val"))
        self.annotated = annotated_frame

    @property
    def has_seg(self) -> bool:
        return self.seg_dir is not None or self.cityscapes is not None or self.seg_from_source

    @property
    def has_depth(self) -> bool:
        return self.depth_dir is not None or self.depth_from_source or self.pseudo_depth is not None

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
        if self.pseudo_depth is not None:
            return self.pseudo_depth(clip_id)
        path = self.depth_dir / f"{clip_id}.npy" if self.depth_dir else None
        return np.load(path).astype(np.float32) if path is not None and path.exists() else None


SOURCE = "source"  # --labels source / --depth-labels source: the store's own source renders them
PSEUDO_DEPTH = "pseudo-depth"  # --depth-labels pseudo-depth: the store's frames/pseudo_depth


def normalized_disparity(d: np.ndarray) -> np.ndarray:
    """A relative disparity map (known up to scale and shift, not constant) min-max normalized to [0, 1], float32:
    what a depth head trained on pseudo-depth predicts."""
    d = np.asarray(d, np.float32)
    lo, hi = float(d.min()), float(d.max())
    return (d - lo) / (hi - lo)


class _PseudoDepth:
    """A store's pseudo-depth of each clip's annotated frame (a feature frame), normalized; None for a constant map."""

    def __init__(self, store, annotated_frame: int):
        from . import InferenceError

        if store is None or not store.has_pseudo_depth:
            where = store.location if store is not None else "the store"
            raise InferenceError(f"depth labels from the pseudo-depth: {where} holds none (cache --pseudo-depth)")
        step = store.geometry.temporal_downsample
        if annotated_frame % step:
            raise InferenceError(
                f"depth labels from the pseudo-depth: frame {annotated_frame} is no feature frame (every {step}th is)"
            )
        self.store, self.k = store, annotated_frame // step
        table = store.clip_table["id"]
        self.rows = {str(table[store.row(i, v)]): (i, v) for i in range(len(store)) for v in range(store.num_variants)}

    def __call__(self, clip_id: str) -> np.ndarray | None:
        if clip_id not in self.rows:
            return None
        i, v = self.rows[clip_id]
        row = int(self.store._feature_rows[self.store.row(i, v)][self.k])
        d = self.store.read_pseudo_depth_row(row)
        return normalized_disparity(d) if d.max() > d.min() else None


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
