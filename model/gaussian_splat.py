"""PredGS: Stage 1's output tokens as 2D Gaussians, rendered differentiably onto the feature grid.

Predictive differentiable rendering (PDR / PredGS) is a plug-in adapter for a predictor's output: each
output token emits ``K`` 2D Gaussians with 5 + C parameters (a 2D position, two scales, a rotation
and C channel amplitudes, "supporting arbitrary channels"), which are rendered into the predicted map
and trained with L1 + SSIM (model/ssim.py) instead of a per-cell regression loss. Stage 1's tokens sit
one per cell of the masked frame's H x W grid, so token (y, x) emits its K Gaussians around the centre
of cell (y, x); units below are grid cells.

Parameters per Gaussian, bounded so that a Gaussian stays inside the window it is rendered in:

* position: an offset from its cell centre, ``max_offset * tanh(raw)`` with ``max_offset`` half the
  window's reach (``window // 2 / 2`` cells: 1 cell for a 5-cell window);
* two scales (standard deviations along its own axes), ``log sigma`` squashed by a sigmoid into
  ``[log MIN_SCALE, log(window / 6)]`` (a soft clamp: gradients never die at the bounds; at the upper
  bound 3 sigma reach the window's edge from the cell centre);
* a rotation angle (radians, unbounded: it is periodic);
* C amplitudes: the Gaussian's value at its centre in each channel (peak-normalised, no opacity: an
  opacity is a common factor of the amplitudes).

Rendering. A pixel's value is the plain sum of every Gaussian's weight there times its amplitudes,
``out(p) = sum_n exp(-q_n(p) / 2) a_n`` (GaussianImage's accumulated summation, no alpha blending).
Why not normalise by the total weight (``sum w a / (sum w + eps)``): the features are signed PCA
coefficients, not colours, so a convex combination buys nothing; the plain sum is linear in the
amplitudes, so the head can reproduce any map (the amplitudes absorb overlaps; one tiny Gaussian per
cell is the linear head), and it has no division whose gradient explodes where coverage is thin.
Each Gaussian is evaluated only on the ``window x window`` cells around its own cell: memory is
O(N * window^2) weights plus one B x H x W x C map per window offset in turn, never O(N * H * W). The
tail beyond the window is dropped (rendered values stay smooth in the parameters, cut in extent).

``render_scale`` s > 1 renders on a grid s times finer and average-pools it back: each weight is the
mean of the Gaussian over s x s sample points in the target cell. Because the render is linear in the
amplitudes, pooling the fine C-channel map equals rendering with these pooled weights, so the fine map
is never built: supersampling costs O(N * (window * s)^2) scalars, not O(N * window^2 * s^2 * C).
It keeps Gaussians narrower than a cell, or between cell centres, visible and differentiable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MIN_SCALE", "GaussianHead", "max_offset", "render", "scale_bounds"]

MIN_SCALE = 0.1  # cells: a Gaussian this narrow at a cell centre covers that cell alone (neighbours e^-50)
GEOMETRY = 5  # parameters of a Gaussian besides its amplitudes: 2 offsets, 2 log-scales, 1 angle


def max_offset(window: int) -> float:
    """How far (cells) a Gaussian's centre may move from its cell centre: half the window's reach."""
    return (window // 2) / 2


def scale_bounds(window: int) -> tuple[float, float]:
    """(lowest, highest) standard deviation in cells: 3 sigma at most reach the window's edge."""
    return MIN_SCALE, window / 6


def _sample_points(window: int, scale: int, like: torch.Tensor) -> torch.Tensor:
    """Positions (cells, relative to the source cell's centre) of the window's sample points along one
    axis: ``scale`` sub-cell points per cell, [window * scale]."""
    r = window // 2
    cells = torch.arange(-r, r + 1, dtype=like.dtype, device=like.device)
    sub = (torch.arange(scale, dtype=like.dtype, device=like.device) + 0.5) / scale - 0.5
    return (cells[:, None] + sub[None, :]).reshape(-1)


def footprint(
    offsets: torch.Tensor, log_scales: torch.Tensor, angles: torch.Tensor, window: int, scale: int = 1
) -> torch.Tensor:
    """Each Gaussian's weight on the cells of its window, [..., window, window].

    offsets [..., 2] (dy, dx) and log_scales [..., 2] (along the Gaussian's own u, v axes) in cells,
    angles [...] in radians (u is the x axis rotated by the angle towards y)."""
    pts = _sample_points(window, scale, offsets)  # [S], S = window * scale
    dy = pts[:, None] - offsets[..., 0, None, None]  # [..., S, 1]: sample rows minus the centre
    dx = pts[None, :] - offsets[..., 1, None, None]  # [..., 1, S]
    cos, sin = angles.cos()[..., None, None], angles.sin()[..., None, None]
    inv = torch.exp(-log_scales)
    u = (cos * dx + sin * dy) * inv[..., 0, None, None]  # [..., S, S]
    v = (cos * dy - sin * dx) * inv[..., 1, None, None]
    weights = torch.exp(-0.5 * (u * u + v * v))  # the Gaussian on the fine grid, peak 1
    lead = weights.shape[:-2]
    return weights.reshape(*lead, window, scale, window, scale).mean(dim=(-3, -1))  # pooled to cells


def render(
    offsets: torch.Tensor,
    log_scales: torch.Tensor,
    angles: torch.Tensor,
    amplitudes: torch.Tensor,
    window: int,
    scale: int = 1,
) -> torch.Tensor:
    """The map [B, H, W, C] of K Gaussians per cell: offsets, log_scales [B, K, H, W, 2], angles
    [B, K, H, W], amplitudes [B, K, H, W, C] (module docstring). Gaussians are cut at the map's edge."""
    b, k, h, w, c = amplitudes.shape
    r = window // 2
    weights = footprint(offsets, log_scales, angles, window, scale).to(amplitudes.dtype)  # [B, K, H, W, win, win]
    weights = weights.permute(0, 2, 3, 4, 5, 1).reshape(b * h * w, window * window, k)  # [BHW, win^2, K]
    amps = amplitudes.permute(0, 2, 3, 1, 4).reshape(b * h * w, k, c)  # [BHW, K, C], saved once for backward
    canvas = amplitudes.new_zeros(b, h + 2 * r, w + 2 * r, c)  # the map with a margin of r cells
    for i in range(window):
        for j in range(window):
            o = i * window + j
            # what the Gaussians of cell (y, x) put on cell (y + i - r, x + j - r): [B, H, W, C]
            part = torch.bmm(weights[:, o : o + 1], amps).reshape(b, h, w, c)
            canvas[:, i : i + h, j : j + w] += part  # autograd keeps no copy: a slice's gradient is a slice
    return canvas[:, r : r + h, r : r + w]


class GaussianHead(nn.Module):
    """PredGS's adapter: tokens [B, H, W, dim] -> K Gaussians per token -> the rendered map [B, H, W, C].

    One linear map per token gives the 5 geometry parameters and the C amplitudes of each of its K
    Gaussians (``geometry`` and ``amplitude`` are that map's two row blocks). At initialisation the
    amplitudes are zero (a fresh model predicts zero, the PCA mean, as the linear head does) and every
    token's Gaussians sit on the same sub-cell lattice with scale ``0.5 / ceil(sqrt(K))`` cells: the K
    Gaussians of a token start apart, so they do not stay copies of each other.
    """

    def __init__(self, dim: int, channels: int, per_token: int, window: int, scale: int = 1):
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        self.per_token, self.channels, self.window, self.scale = per_token, channels, window, scale
        self.geometry = nn.Linear(dim, per_token * GEOMETRY)
        self.amplitude = nn.Linear(dim, per_token * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        k, side = self.per_token, math.ceil(math.sqrt(self.per_token))
        lattice = [((i + 0.5) / side - 0.5, (j + 0.5) / side - 0.5) for i in range(side) for j in range(side)][:k]
        lo, hi = scale_bounds(self.window)
        sigma = 0.5 / side
        bias = torch.zeros(k, GEOMETRY)  # per Gaussian: raw dy, dx, log-scale u, v, angle
        bias[:, :2] = torch.atanh(torch.tensor(lattice) / max_offset(self.window))
        mid = (math.log(sigma) - math.log(lo)) / (math.log(hi) - math.log(lo))  # sigmoid(raw) = mid
        mid = min(max(mid, 0.05), 0.95)  # many Gaussians per token: the lattice's scale may pass MIN_SCALE
        bias[:, 2:4] = math.log(mid / (1 - mid))
        with torch.no_grad():
            self.geometry.bias.copy_(bias.flatten())
        for p in (self.geometry.weight, self.amplitude.weight, self.amplitude.bias):
            nn.init.zeros_(p)

    def gaussians(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(offsets, log_scales [B, K, H, W, 2], angles [B, K, H, W], amplitudes [B, K, H, W, C]) in float32:
        under bf16 autocast the products are bf16, their sum over the window float32."""
        b, h, w, _ = tokens.shape
        k = self.per_token
        geo = self.geometry(tokens).float().reshape(b, h, w, k, GEOMETRY).permute(0, 3, 1, 2, 4)
        amplitudes = self.amplitude(tokens).float().reshape(b, h, w, k, self.channels).permute(0, 3, 1, 2, 4)
        lo, hi = (math.log(s) for s in scale_bounds(self.window))
        offsets = max_offset(self.window) * torch.tanh(geo[..., :2])
        log_scales = lo + (hi - lo) * torch.sigmoid(geo[..., 2:4])
        return offsets, log_scales, geo[..., 4], amplitudes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return render(*self.gaussians(tokens), self.window, self.scale)  # [B, H, W, C]
