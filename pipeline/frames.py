"""Frame preparation shared by the cache job and any direct computation: resize without cropping
(bilinear, antialiased) and horizontal flips. Both paths must call these so their features agree."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """float [N, C, H, W] -> [N, C, *hw]: bilinear with antialiasing, no crop (the aspect ratio may
    change). The one resize of the project: the cache job's CPU stage and the encoders both use it."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)


def resize_frames(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, h, w, 3]; a no-op when the size already matches."""
    frames = np.asarray(frames)
    if frames.shape[1:3] == tuple(hw):
        return frames
    y = resize(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float(), hw)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def hflip(frames: np.ndarray) -> np.ndarray:
    """Mirror left-right: uint8 [..., H, W, 3]."""
    return np.ascontiguousarray(frames[..., ::-1, :])
