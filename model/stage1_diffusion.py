"""A diffusion Stage 1 (issue 14, option): forecast the next feature frame by sampling a latent diffusion
model in the PCA feature space, instead of regressing it with the masked feature transformer.

Same data, same window and same rollout as ``model.stage1``: 4 context frames predict the next one, and
``stage1.rollout`` slides the window over latent frames 4, 5, 6 (the rollout job writes the *sampled*
features into clips/pred_features). The diffusion is ``model.diffusion``'s, unchanged: the window's
features [B, 5, H, W, C] are laid out as [B, C, 5, H, W] so that its 4 context frames are clean
"context latents" (c_noise 0.001, returned unchanged) and the 5th is the one noised frame: EDM
preconditioning, the same sigma distribution (log-normal plus the 5 % tail), the loss weight 1/t^2
(F-space MSE against eps - z), and its Euler/Heun sampler on the Karras schedule.

Scale. That preconditioning assumes data of unit scale, while PCA channels have very different
variances (ordered by explained variance). Each clip's features are divided per channel by that
channel's RMS over the clip's context frames (floored at 1e-2 x the largest channel RMS, so zero
channels stay zero), and the sampled frame is multiplied back: the scale comes from the context, which
is all a rollout has.

The denoiser ``FeatureDenoiser`` reuses Stage 1's separable blocks (temporal then spatial attention, MLP)
and broadcast position tables over the 5 x H x W window. Its input per token is the frame's C channels
plus a context-mask channel (as Stage 2 does), linearly embedded; the noise level enters as a sinusoidal
embedding of c_noise through an MLP, added to every token of its frame. The output projection starts at
zero (F = 0). ``FeatureDiffusion`` wraps it with the sampler: calling it on context frames
[B, 4, H, W, C] samples the next frame [B, H, W, C] (so ``stage1.rollout`` and the rollout job take it
as they take the regression model); called with (x, c_noise, context_mask) it is the denoiser network.
Sampling noise is drawn per clip from a seed derived from the values of the window's oldest frame, which
in a rollout of up to 4 frames is always a ground-truth frame (a predicted one differs in its last bits
with the batch size, and its hash with it): so a rollout is the same for a clip whatever the batching and
whether or not the job was interrupted.

Deterministic forecasts: with ``forecast_samples`` N > 1 the forecast is the mean of N samples (each clip's
N noises drawn in turn from its seeded generator, the first being the one N = 1 samples from), an estimate
of the conditional mean that a regression predicts; N = 1 (the default) forecasts one sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import einops
import torch
from torch import nn

from . import diffusion
from .stage1 import BroadcastPosEmbed, SeparableBlock, Stage1Config
from .stage2 import timestep_embedding

__all__ = ["DiffusionStage1Config", "FeatureDenoiser", "FeatureDiffusion", "context_scale", "training_loss"]

SCALE_FLOOR = 1e-2  # a channel's scale is at least this fraction of the clip's largest channel RMS


@dataclass
class DiffusionStage1Config(Stage1Config):
    """Stage 1's sizes (``Stage1Config``) plus the sampler that forecasts each frame."""

    sample_steps: int = 18
    sample_solver: str = "heun"
    forecast_samples: int = 1  # the forecast is the mean of this many samples (1: one sample)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_steps < 1 or self.sample_solver not in ("heun", "euler"):
            raise ValueError("sample_steps must be >= 1 and sample_solver 'heun' or 'euler'")
        if (self.head, self.loss) != ("linear", "smooth_l1"):  # its denoiser and EDM loss are its own
            raise ValueError(f"head {self.head!r} and loss {self.loss!r} are the regression Stage 1's, not diffusion's")
        if self.forecast_samples < 1:
            raise ValueError(f"forecast_samples must be >= 1, got {self.forecast_samples}")


class FeatureDenoiser(nn.Module):
    """The network F of the feature diffusion: (x [B, C, T, H, W], c_noise [B, T], context_mask [B, T]) ->
    F [B, C, T, H, W], T = context_frames + 1."""

    def __init__(self, config: DiffusionStage1Config):
        super().__init__()
        self.config = config
        c, d = config.num_pca_channels, config.dim
        h, w = config.feature_hw
        self.input_proj = nn.Linear(c + 1, d)
        self.noise_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pos_embed = BroadcastPosEmbed((config.num_frames, h, w), d)
        self.blocks = nn.ModuleList(
            SeparableBlock(d, config.num_heads, config.mlp_ratio, config.dropout) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(d)
        self.output_proj = nn.Linear(d, c)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.output_proj.weight)

    def forward(self, x, c_noise, context_mask, features=None):
        cfg = self.config
        b, c, t, h, w = x.shape
        if (c, t, (h, w)) != (cfg.num_pca_channels, cfg.num_frames, tuple(cfg.feature_hw)):
            raise ValueError(
                f"expected x [B, {cfg.num_pca_channels}, {cfg.num_frames}, {cfg.feature_hw}], got {tuple(x.shape)}"
            )
        dtype = self.input_proj.weight.dtype
        mask = context_mask.to(dtype)[:, :, None, None, None].expand(b, t, h, w, 1)
        tokens = self.input_proj(torch.cat([einops.rearrange(x.to(dtype), "b c t h w -> b t h w c"), mask], -1))
        noise = self.noise_mlp(timestep_embedding(c_noise, cfg.dim).to(dtype))  # [B, T, d]
        tokens = tokens + noise[:, :, None, None, :] + self.pos_embed().to(dtype)
        for block in self.blocks:
            tokens = block(tokens)
        out = self.output_proj(self.norm_out(tokens))  # [B, T, H, W, C]
        return einops.rearrange(out, "b t h w c -> b c t h w")


def context_scale(context: torch.Tensor) -> torch.Tensor:
    """Per-clip, per-channel scale [B, 1, 1, 1, C] of context features [B, T, H, W, C] (module docstring)."""
    rms = context.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return rms.clamp_min(SCALE_FLOOR * rms.amax(dim=-1, keepdim=True).clamp_min(1e-12))


def _layout(window: torch.Tensor) -> torch.Tensor:  # [B, T, H, W, C] -> [B, C, T, H, W]
    return einops.rearrange(window, "b t h w c -> b c t h w")


def _clip_seed(context: torch.Tensor) -> int:
    data = context.detach().float().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & ((1 << 63) - 1)


def _clip_noise(frame: torch.Tensor, shape: tuple, n: int) -> list[torch.Tensor]:
    """n noises of `shape`, drawn in turn from the generator seeded by the values of `frame`."""
    g = torch.Generator().manual_seed(_clip_seed(frame))
    return [torch.randn(shape, generator=g) for _ in range(n)]


class FeatureDiffusion(nn.Module):
    """The diffusion Stage 1: ``net`` (a ``FeatureDenoiser``) plus its sampler (module docstring)."""

    def __init__(self, config: DiffusionStage1Config):
        super().__init__()
        self.config = config
        self.net = FeatureDenoiser(config)

    def forward(self, x, c_noise=None, context_mask=None, features=None):
        if c_noise is not None:  # the denoiser network, for the loss
            return self.net(x, c_noise, context_mask, features)
        return self.sample_next(x)

    def sample_next(self, context: torch.Tensor) -> torch.Tensor:
        """The forecast of the frame after context [B, 4, H, W, C]: the mean of ``forecast_samples`` samples,
        [B, H, W, C] float32."""
        return self.samples(context, self.config.forecast_samples).mean(dim=1)

    @torch.no_grad()
    def samples(self, context: torch.Tensor, n: int) -> torch.Tensor:
        """n samples of the frame after context [B, 4, H, W, C]: [B, n, H, W, C] float32."""
        cfg = self.config
        if context.ndim != 5 or context.shape[1] != cfg.context_frames:
            raise ValueError(f"expected context [B, {cfg.context_frames}, H, W, C], got {tuple(context.shape)}")
        scale = context_scale(context)
        ctx = _layout(context.float() / scale)  # [B, C, 4, H, W]
        noise = torch.stack(
            [draw for clip in context for draw in _clip_noise(clip[0], (ctx.shape[1], 1, *ctx.shape[3:]), n)]
        ).to(ctx.device)  # [B * n, C, 1, H, W]
        out = diffusion.sample(
            self.net,
            ctx.repeat_interleave(n, dim=0),
            None,
            num_steps=cfg.sample_steps,
            solver=cfg.sample_solver,
            num_future=1,
            initial_noise=noise,
        )  # [B * n, C, 5, H, W]
        out = einops.rearrange(out[:, :, -1], "(b n) c h w -> b n h w c", n=n)
        return out * scale  # [B, n, H, W, C]


def training_loss(model, context: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None):
    """EDM loss of the next frame: context [B, 4, H, W, C], target [B, H, W, C]; ``model`` a
    ``FeatureDiffusion`` (or DDP around one). Returns (loss, logs) as ``diffusion.training_loss``."""
    scale = context_scale(context)
    window = torch.cat([context.float(), target.float()[:, None]], dim=1) / scale
    return diffusion.training_loss(model, _layout(window), None, context.shape[1], generator)
