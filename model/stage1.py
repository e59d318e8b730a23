"""Stage 1: the DINO-Foresight masked feature transformer over PCA-projected DINOv2 features.

Re2Pix (sec. 3.1, app. 9.2) adopts the masked feature transformer of DINO-Foresight (Karypidis et
al., arXiv 2412.11673): the model sees ``context_frames`` (4) feature maps plus one frame whose
tokens are *all* replaced by a learned mask token, and regresses that frame's features with a
SmoothL1 loss. At inference it rolls out autoregressively with a sliding 4-frame window.

Architecture, as in the reference implementation (its ``simple_replace`` masking with
``--seperable_attention``, window size 1):

* a linear input projection ``num_pca_channels -> dim`` (with bias) of the context frames; the
  target frame's tokens are a learned ``mask_token`` (the reference's "replace vector"), put in
  *after* the projection, so the target frame's input values can never reach the output;
* broadcast 3D position embeddings: three learned tables for t, h and w of ``dim // 3``
  channels each, broadcast over the other two axes and concatenated on the channel axis (the
  reference's ``AddBroadcastPosEmbed``) and added to the tokens;
* ``num_layers`` pre-norm blocks with separable attention: temporal self-attention over the T = 5 frames
  at each spatial position, then spatial self-attention over the H*W tokens of each frame, then an
  MLP (GELU, ``mlp_ratio`` x dim). This is the reference's order (temporal first); both
  attentions have qkv and output biases, like ``nn.MultiheadAttention``;
* a final LayerNorm (the reference has none; a pre-norm stack conventionally ends with one, it
  costs 2*dim parameters) and a linear output projection ``dim -> num_pca_channels`` whose
  weight starts at zero (as in the reference), so a fresh model predicts its output bias (zero).

``head="gaussian"`` replaces that output projection with PredGS's adapter (model/gaussian_splat.py):
each token of the masked frame emits K 2D Gaussians that are rendered onto the feature grid; it also
starts at zero. ``loss`` picks SmoothL1 (the reference's), PDR's L1 + SSIM (model/ssim.py) or their sum;
any head trains with any loss.

Parameter count of :meth:`Stage1Config.paper` (C = dim = 1152, 12 blocks, mlp 4x):
per block 2 * (4 d^2 + 4 d) attention + (8 d^2 + 5 d) MLP + 3 * 2 d norms = 16 d^2 + 19 d
= 21,255,552; times 12 = 255,066,624; plus the input and output projections 2 * (C d + d) =
2,656,512, the position tables (5 + 32 + 56) * 384 = 35,712, the final norm 2,304 and the mask token
1,152: 257,762,304 in all, i.e. the "≈ 260M by our count" of docs/design.md, "Reading the paper" (Sizes).

Shapes: features are channels-last, ``[B, T, H, W, C]``, as the store keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import Sized, require

from .gaussian_splat import GaussianHead
from .ssim import SSIM_WEIGHT, l1_ssim

__all__ = [
    "MaskedFeatureTransformer",
    "Stage1Config",
    "config_loss",
    "loss",
    "rollout",
    "stage1_batch",
]

HEADS = ("linear", "gaussian")
LOSSES = ("smooth_l1", "l1_ssim", "smooth_l1+l1_ssim")


@dataclass
class Stage1Config(Sized):
    """Sizes of the Stage 1 masked feature transformer.

    ``feature_hw`` is the DINOv2 patch grid (32 x 56 for 448 x 784 inputs); ``context_frames`` are
    latent-rate feature frames (one DINOv2 map per VAE latent frame). ``dropout`` applies to the
    attention probabilities and the MLP (as ``nn.MultiheadAttention`` + the reference MLP do).
    ``smooth_l1_beta`` is the SmoothL1 transition point: DINO-Foresight's ``--beta_smoothl1``
    defaults to 0.1 and its published commands keep that default. The sizes are named as the Stage 2
    DiT's (``dim``, ``num_layers``, ``num_heads``); ``SIZES`` holds the named ones. ``head``, ``loss``
    and the Gaussian head's sizes (module docstring) default to the reference's linear head and
    SmoothL1: checkpoints saved before they existed load as that.
    """

    num_pca_channels: int = 1152
    feature_hw: tuple[int, int] = (32, 56)
    context_frames: int = 4
    dim: int = 1152
    num_layers: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    smooth_l1_beta: float = 0.1
    gradient_checkpointing: bool = False
    head: str = "linear"
    loss: str = "smooth_l1"
    gaussians_per_token: int = 4
    render_window: int = 5
    render_scale: int = 2
    ssim_weight: float = SSIM_WEIGHT

    HELP = {  # jobs.train's --stage1.model.FIELD help
        "dim": "hidden width (divisible by 3 and by num_heads)",
        "num_layers": "transformer blocks",
        "num_heads": "attention heads",
        "mlp_ratio": "MLP width / dim",
        "dropout": "dropout of attention and MLP",
        "smooth_l1_beta": "SmoothL1 loss transition point",
        "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
        "head": "output head: linear (a projection per token) or gaussian (PredGS: K rendered 2D Gaussians per token)",
        "loss": "smooth_l1, l1_ssim (PDR: (1 - w) L1 + w (1 - SSIM)) or smooth_l1+l1_ssim (their sum)",
        "gaussians_per_token": "with head gaussian: Gaussians K each token emits",
        "render_window": "with head gaussian: side (grid cells, odd) of the window a Gaussian is rendered in",
        "render_scale": "with head gaussian: render on a grid this many times finer, average-pooled back",
        "ssim_weight": "with loss l1_ssim: the SSIM term's weight w (3DGS's 0.2)",
    }

    # paper: Re2Pix app. 9.2 / DINO-Foresight, 12 layers, hidden 1152, 8 heads (the reference's
    # ``--hidden_dim 1152 --heads 8 --layers 12 --dropout 0.1``), 1152 PCA channels on a 32 x 56 grid,
    # 4 context frames; tiny: the CPU demo and tests, 64 PCA channels on an 8 x 14 grid, dim 96, 2 blocks
    SIZES = {
        "tiny": {"num_pca_channels": 64, "feature_hw": (8, 14), "dim": 96, "num_layers": 2, "num_heads": 4},
        "paper": {"dropout": 0.1},
    }
    FROM_DATA = ("num_pca_channels", "feature_hw", "context_frames")  # the trainer takes these from the store
    RENAMED = {"hidden": "dim", "depth": "num_layers", "heads": "num_heads"}  # checkpoints saved before

    def __post_init__(self) -> None:
        self.feature_hw = tuple(int(v) for v in self.feature_hw)  # JSON presets give lists
        for name in ("num_pca_channels", "dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if len(self.feature_hw) != 2 or min(self.feature_hw) < 1:
            raise ValueError(f"feature_hw must be (H, W) with H, W >= 1, got {self.feature_hw}")
        if self.context_frames < 1:
            raise ValueError(f"context_frames must be >= 1, got {self.context_frames}")
        if self.dim % 3 != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by 3 (t, h, w position tables)")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.smooth_l1_beta < 0:
            raise ValueError(f"smooth_l1_beta must be >= 0, got {self.smooth_l1_beta}")
        require(self.head in HEADS, "head", f"one of {', '.join(HEADS)}", self.head)
        require(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}", self.loss)
        require(self.gaussians_per_token >= 1, "gaussians_per_token", ">= 1", self.gaussians_per_token)
        require(
            self.render_window >= 3 and self.render_window % 2 == 1, "render_window", "odd and >= 3", self.render_window
        )
        require(self.render_scale >= 1, "render_scale", ">= 1", self.render_scale)
        require(0 <= self.ssim_weight <= 1, "ssim_weight", "in [0, 1]", self.ssim_weight)

    @property
    def num_frames(self) -> int:
        """Frames the transformer attends over: the context plus the one masked target frame."""
        return self.context_frames + 1


class BroadcastPosEmbed(nn.Module):
    """Learned per-axis position tables for (t, h, w), each ``dim // 3`` wide, broadcast over the
    other axes and concatenated on channels: a token at (t, h, w) gets [e_t[t], e_h[h], e_w[w]]."""

    def __init__(self, shape: tuple[int, int, int], dim: int):
        super().__init__()
        if dim % 3 != 0:
            raise ValueError(f"dim ({dim}) must be divisible by 3")
        self.shape = tuple(shape)
        part = dim // 3
        self.t = nn.Parameter(torch.empty(shape[0], part))  # [T, d/3]
        self.h = nn.Parameter(torch.empty(shape[1], part))  # [H, d/3]
        self.w = nn.Parameter(torch.empty(shape[2], part))  # [W, d/3]
        for table in (self.t, self.h, self.w):
            nn.init.trunc_normal_(table, std=0.02)

    def forward(self) -> torch.Tensor:
        t, h, w = self.shape
        part = self.t.shape[-1]
        pos = torch.cat(  # [T, H, W, d]
            [
                self.t[:, None, None, :].expand(t, h, w, part),
                self.h[None, :, None, :].expand(t, h, w, part),
                self.w[None, None, :, :].expand(t, h, w, part),
            ],
            dim=-1,
        )
        return pos


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``[N, L, d]`` sequences with ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "n l (three h e) -> three n h l e", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(einops.rearrange(out, "n h l e -> n l (h e)"))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SeparableBlock(nn.Module):
    """Pre-norm block: temporal attention (over T at each (h, w)), spatial attention (over H*W in
    each frame), MLP; each with a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_time = nn.LayerNorm(dim)
        self.attn_time = SelfAttention(dim, heads, dropout)
        self.norm_space = nn.LayerNorm(dim)
        self.attn_space = SelfAttention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = x.shape  # x: [B, T, H, W, d]
        y = einops.rearrange(x, "b t h w d -> (b h w) t d")
        y = y + self.attn_time(self.norm_time(y))
        y = einops.rearrange(y, "(b h w) t d -> (b t) (h w) d", b=b, h=h, w=w)
        y = y + self.attn_space(self.norm_space(y))
        y = y + self.mlp(self.norm_mlp(y))
        return einops.rearrange(y, "(b t) (h w) d -> b t h w d", b=b, t=t, h=h, w=w)


class MaskedFeatureTransformer(nn.Module):
    """Predicts the next feature frame from ``context_frames`` feature frames.

    ``forward(context)`` takes ``[B, 4, H, W, C]`` and returns the next frame ``[B, H, W, C]``.
    It also accepts the full ``[B, 5, H, W, C]`` window (context + target, as DINO-Foresight's
    trainer feeds it); the target frame's values are then ignored: its tokens are the mask token.
    """

    def __init__(self, config: Stage1Config):
        super().__init__()
        self.config = config
        c, d = config.num_pca_channels, config.dim
        h, w = config.feature_hw
        self.input_proj = nn.Linear(c, d, bias=True)
        self.mask_token = nn.Parameter(torch.empty(d))  # the reference's learned "replace vector"
        self.pos_embed = BroadcastPosEmbed((config.num_frames, h, w), d)
        self.blocks = nn.ModuleList(
            SeparableBlock(d, config.num_heads, config.mlp_ratio, config.dropout) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(d)
        if config.head == "gaussian":  # PredGS: tokens -> Gaussians -> the rendered frame
            k, window, scale = config.gaussians_per_token, config.render_window, config.render_scale
            self.output_proj = GaussianHead(d, c, k, window, scale)
        else:
            self.output_proj = nn.Linear(d, c, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.input_proj.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        # Zero output weight, as the reference: a fresh model predicts zero (the PCA mean).
        if isinstance(self.output_proj, GaussianHead):
            self.output_proj.reset_parameters()  # zero amplitudes, its Gaussians on their start lattice
        else:
            nn.init.zeros_(self.output_proj.weight)
            nn.init.zeros_(self.output_proj.bias)

    def _check_frames(self, frames: torch.Tensor) -> None:
        cfg = self.config
        if frames.ndim != 5:
            raise ValueError(f"expected features [B, T, H, W, C], got shape {tuple(frames.shape)}")
        _, t, h, w, c = frames.shape
        if t not in (cfg.context_frames, cfg.num_frames):
            raise ValueError(
                f"expected {cfg.context_frames} context frames (or {cfg.num_frames} with the target), got {t}"
            )
        if (h, w) != cfg.feature_hw or c != cfg.num_pca_channels:
            raise ValueError(
                f"expected frames of {cfg.feature_hw} x {cfg.num_pca_channels} channels, got {(h, w)} x {c}"
            )

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Transformer input tokens ``[B, 5, H, W, hidden]``: projected context frames, then the mask
        token for the whole target frame, plus position embeddings. ``frames`` is the context
        ``[B, 4, H, W, C]`` or the window ``[B, 5, H, W, C]`` whose last frame is discarded."""
        self._check_frames(frames)
        cfg = self.config
        context = frames[:, : cfg.context_frames]
        tokens = self.input_proj(context.to(self.input_proj.weight.dtype))  # [B, 4, H, W, d]
        b, _, h, w, d = tokens.shape
        masked = self.mask_token.to(tokens.dtype).expand(b, 1, h, w, d)  # [B, 1, H, W, d]
        tokens = torch.cat([tokens, masked], dim=1)  # [B, 5, H, W, d]
        return tokens + self.pos_embed().to(tokens.dtype)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.embed(context)  # [B, 5, H, W, d]
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = x[:, -1]  # only the masked frame is predicted: [B, H, W, d]
        return self.output_proj(self.norm_out(x))  # [B, H, W, C]


def loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    beta: float = 0.1,
    kind: str = "smooth_l1",
    ssim_weight: float = SSIM_WEIGHT,
) -> torch.Tensor:
    """The loss between the predicted and true masked frame ``[B, H, W, C]``, averaged over every
    element of the frame (the whole frame is masked). ``kind`` "smooth_l1": SmoothL1, ``beta = 0.1``
    being DINO-Foresight's default; "l1_ssim": PDR's (1 - ssim_weight) L1 + ssim_weight (1 - SSIM);
    "smooth_l1+l1_ssim": their sum (:func:`config_loss` takes all three from a config).
    Computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    require(kind in LOSSES, "loss", f"one of {', '.join(LOSSES)}", kind)
    parts = kind.split("+")
    total = torch.zeros((), device=pred.device)
    if "smooth_l1" in parts:
        total = total + F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
    if "l1_ssim" in parts:
        total = total + l1_ssim(pred, target, ssim_weight)
    return total


def config_loss(config: Stage1Config, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`loss` as ``config`` chooses it (its kind, SmoothL1 beta and SSIM weight)."""
    return loss(pred, target, config.smooth_l1_beta, config.loss, config.ssim_weight)


def rollout(model: MaskedFeatureTransformer, context: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Autoregressive prediction of ``steps`` frames with a sliding window of the model's
    ``context_frames``: from (0, 1, 2, 3) predict 4̂, from (1, 2, 3, 4̂) predict 5̂, from
    (2, 3, 4̂, 5̂) predict 6̂. ``context`` is ``[B, 4, H, W, C]``; returns ``[B, steps, H, W, C]``.

    Gradients flow through unless the caller wraps it in ``torch.no_grad()`` / ``inference_mode()``;
    the model's train/eval mode is the caller's too.
    """
    n = model.config.context_frames
    if context.ndim != 5 or context.shape[1] != n:
        raise ValueError(f"expected context [B, {n}, H, W, C], got shape {tuple(context.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    window = context
    preds = []
    for _ in range(steps):
        pred = model(window).to(window.dtype)  # [B, H, W, C]
        preds.append(pred)
        window = torch.cat([window[:, 1:], pred[:, None]], dim=1)  # slide: drop oldest, append 4̂...
    return torch.stack(preds, dim=1)  # [B, steps, H, W, C]


def stage1_batch(
    features: torch.Tensor,
    generator: torch.Generator | None = None,
    context_frames: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs from whole clips: for each sample pick a target frame t uniformly from the
    future frames ``[context_frames, T - 1]`` (4, 5 or 6 for the 7 latent-rate frames of a clip) and
    return its ground-truth context ``features[:, t-4 : t]`` ``[B, 4, H, W, C]`` and target
    ``features[:, t]`` ``[B, H, W, C]``.

    Why: DINO-Foresight trains on 5-frame windows starting uniformly anywhere in a sequence (its
    ``start_idx = randint(...)``), always with ground-truth context (teacher forcing). A 7-frame
    clip holds exactly three such windows, ending at 4, 5 and 6; sampling among them uniformly uses
    every frame of the clip and matches the windows the rollout needs (with predicted context at
    inference time). ``generator`` (on the features' device, or the CPU) makes the choice reproducible.
    """
    if features.ndim != 5:
        raise ValueError(f"expected features [B, T, H, W, C], got shape {tuple(features.shape)}")
    b, t_total = features.shape[:2]
    if t_total <= context_frames:
        raise ValueError(f"need more than {context_frames} frames to have a target, got {t_total}")
    draw_on = generator.device if generator is not None else features.device  # a device generator draws there
    target_idx = torch.randint(context_frames, t_total, (b,), generator=generator, device=draw_on)  # [B] in [4, T-1]
    target_idx = target_idx.to(features.device)
    rows = torch.arange(b, device=features.device)
    offsets = torch.arange(-context_frames, 0, device=features.device)  # [-4, -3, -2, -1]
    context = features[rows[:, None], target_idx[:, None] + offsets[None, :]]  # [B, 4, H, W, C]
    target = features[rows, target_idx]  # [B, H, W, C]
    return context, target
