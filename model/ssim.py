"""SSIM as a training loss on feature maps, and PDR's L1 + SSIM objective (model/gaussian_splat.py).

SSIM (Wang et al. 2004) per channel of an H x W map with the usual 11-tap Gaussian window (sigma 1.5)
and constants (K1 0.01, K2 0.03) times the data range. Unlike the evaluation metric of
inference/video_metrics.py (valid windows only, float64, frames of at least 11 x 11 pixels) it runs on
any grid, the demo's 8 x 14 included: the window is cut at the map's edge and renormalised over the
cells inside (local means of real cells only, where zero padding would pull the border's means to 0).

The data range. PCA features are signed and unbounded, so there is no fixed range; each sample uses
its target's range (max - min over H, W and C, no gradient). One range for all channels keeps the
weighting of L1: a low-variance PCA channel's local contrast is small next to the constants, its SSIM
stays near 1 and it weighs little, as its L1 error does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SSIM_WEIGHT", "l1_ssim", "ssim"]

WINDOW, SIGMA = 11, 1.5
K1, K2 = 0.01, 0.03
# (1 - lambda) L1 + lambda (1 - SSIM): lambda 0.2 is 3D Gaussian Splatting's, which PDR's recipe follows
SSIM_WEIGHT = 0.2


def _taps(like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=like.dtype, device=like.device) - (WINDOW - 1) / 2
    g = torch.exp(-(x * x) / (2 * SIGMA**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of [N, 1, H, W], zero outside the map ('same' size)."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k), padding=(0, k // 2))
    return F.conv2d(x, g.view(1, 1, k, 1), padding=(k // 2, 0))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each sample over its cells and channels: [B, H, W, C] pairs -> [B], in float32."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two maps [B, H, W, C] of one shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    b, h, w, c = pred.shape
    x = pred.float().permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    y = target.float().permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    g = _taps(x)
    mass = _blur(torch.ones_like(x[:1]), g)  # the window's weight inside the map, [1, 1, H, W]
    mx, my, xx, yy, xy = (_blur(t, g) / mass for t in (x, y, x * x, y * y, x * y))
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    t = target.detach().float().reshape(b, -1)
    data_range = (t.amax(dim=1) - t.amin(dim=1)).clamp_min(1e-6).repeat_interleave(c)[:, None, None, None]
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.reshape(b, -1).mean(dim=1)


def l1_ssim(pred: torch.Tensor, target: torch.Tensor, weight: float = SSIM_WEIGHT) -> torch.Tensor:
    """PDR's loss on [B, H, W, C] maps: (1 - weight) * L1 + weight * (1 - SSIM), a scalar in float32."""
    l1 = (pred.float() - target.float()).abs().mean()
    return (1 - weight) * l1 + weight * (1 - ssim(pred, target).mean())
