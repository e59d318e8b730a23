"""The semantic evaluation (paper appendix 9.3): DPT heads (inference/dpt.py) on DINOv2 features of a
decoded frame, or on Stage 1's forecast PCA features un-projected to the full feature space, scored
against the labels of the clip's annotated frame (segmentation mIoU, depth AbsRel / delta1)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from . import InferenceError
from .labels import Labels


def load_heads(seg_head: str | None, depth_head: str | None, labels: Labels, space, device, skipped: dict) -> dict:
    """{"seg": head, "depth": head} for the heads given whose labels exist; `skipped` says why not."""
    from .dpt import load_head

    heads = {}
    for task, path, has, flag in (
        ("segmentation", seg_head, labels.has_seg, "--labels"),
        ("depth", depth_head, labels.has_depth, "--depth-labels"),
    ):
        key = "seg" if task == "segmentation" else "depth"
        if not path:
            skipped[key] = f"no --{key}-head given"
        elif not has:
            skipped[key] = f"no {task} labels: the store ({space.manifest.get('dataset')}) offers none; give {flag} DIR"
        else:
            head = load_head(path, device, task=task)
            if head.cfg.in_dim * 4 != space.geometry.feature_dim:
                raise InferenceError(
                    f"{path} takes 4 x {head.cfg.in_dim}-d blocks; the features are {space.geometry.feature_dim}-d"
                )
            heads[key] = head
    return heads


class Semantic:
    """DPT heads on DINOv2 features of frames (`dino`, None without decoded frames), or on un-projected
    PCA features; clips without a label are left out and counted in `missing`."""

    def __init__(self, heads: dict, labels: Labels, space, annotated_frame: int, dino=None):
        g = space.geometry
        if not 0 <= annotated_frame < g.clip_frames:
            raise InferenceError(f"--annotated-frame {annotated_frame} is not a frame of a {g.clip_frames}-frame clip")
        self.heads, self.labels, self.space, self.frame, self.dino = heads, labels, space, annotated_frame, dino
        self.missing: dict[str, set] = defaultdict(set)  # clip ids without a label, per head

    @property
    def active(self) -> bool:
        return bool(self.heads)

    def frames_features(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> DINOv2 features [B, h, w, D] (resized as the cache job does)."""
        from pipeline.frames import resize_frames

        return self.dino(resize_frames(frames, self.space.geometry.dino_input_hw)).float()

    def pca_features(self, pca: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.space.basis.unproject(pca.float().cpu().numpy()))

    @torch.no_grad()
    def score(self, acc, features: torch.Tensor, clip_ids: list[str], metas: list[dict]) -> None:
        """Add to `acc` (an evaluation.Acc) the scores of features [B, h, w, D] of each clip's annotated frame."""
        from .dpt import depth_metrics, segmentation_confusion, split_blocks

        for key, head in self.heads.items():
            dev = next(head.parameters()).device
            for b, (clip_id, meta) in enumerate(zip(clip_ids, metas)):
                label = self.labels.seg(clip_id, meta) if key == "seg" else self.labels.depth(clip_id, meta)
                if label is None:
                    self.missing[key].add(clip_id)
                    continue
                blocks = split_blocks(features[b : b + 1].to(dev))
                pred = head.predict(blocks, size=label.shape[:2])[0]
                target = torch.from_numpy(np.array(label))
                if key == "seg":
                    acc.add_confusion(segmentation_confusion(pred.cpu(), target, head.cfg.num_classes))
                else:
                    for k, v in depth_metrics(pred.cpu(), target).items():
                        acc.depth[k] += float(v)
