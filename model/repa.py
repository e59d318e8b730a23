"""REPA and VideoREPA: the paper's alignment baselines (table 1, "792M"), on the Baseline DiT.

Both train the Baseline DiT (``DiTConfig(semantic=False)``: no feature branch) with the EDM denoising
loss of ``model.diffusion`` plus an alignment loss between the tokens after one intermediate block,
mapped by a small MLP projector to the feature width, and the stored DINOv2 PCA features of the same
latent frames (all 7: the clean context frames and the noisy future ones), resized to the DiT's token
grid exactly as Stage 2's early fusion resizes them (``stage2.features_to_grid``). The features enter
only the loss, never the network: ``AlignedDiT`` refuses them, and sampling needs none.

- **REPA** (Yu et al., ICLR 2025): per-token negative cosine similarity between the projected tokens and
  the features, averaged over tokens. Its defaults: alignment after block 8 of SiT-XL/2's 28, i.e. at
  8/28 of the depth, which is block 4 of our 14 (4/14 = 8/28 exactly; the default ``depth=None`` keeps
  that fraction for any depth, e.g. 8 of Baseline-Large's 28); lambda = 0.5; projector
  Linear(dim, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, C), with biases.
- **VideoREPA** (Zhang et al., NeurIPS 2025): token-relation distillation (TRD). Tokens and features
  are L2-normalized and their Gram matrices over all T*S tokens of a clip compared pair by pair:
  relu(|cos(h_i, h_j) - cos(f_i, f_j)| - margin), a hinge on the absolute difference, so relations
  within the margin cost nothing (VideoREPA's "soft" guidance). Pairs in the same frame are the spatial
  relations, pairs across frames the temporal ones; each has its own margin (0.1 both, VideoREPA's
  released default), and the loss is the mean over all pairs, which with equal margins is exactly
  VideoREPA's loss over the full spatio-temporal Gram matrix. The spatial and temporal means are
  logged apart. lambda = 0.5 (VideoREPA's proj_coeff), same projector; VideoREPA aligned after block
  18 of CogVideoX's 30 or 42 while fine-tuning, we train from scratch and keep REPA's depth.
  Memory: one Gram matrix holds (T*S)^2 floats per clip, 9072^2 * 4 B = 0.33 GB at paper geometry.

Parameter count at paper size (``parameter_counts``): 781,989,376 (the Baseline DiT) + 10,753,152
(the projector to 1152 PCA channels) = 792,742,528, the paper's "792M" (a projector to 768-d DINOv2
features, as in REPA, would make it 791,955,712).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Sized

from . import diffusion
from .stage2 import DiTConfig, Re2PixDiT, features_to_grid, parameter_breakdown

__all__ = [
    "METHODS",
    "REPA_DEPTH_FRACTION",
    "AlignConfig",
    "AlignedDiT",
    "Projector",
    "alignment_terms",
    "from_model_config",
    "parameter_counts",
    "repa_loss",
    "target_tokens",
    "training_loss",
    "trd_loss",
]

METHODS = ("repa", "videorepa")
REPA_DEPTH_FRACTION = 8 / 28  # REPA: block 8 of SiT-XL/2's 28


@dataclass
class AlignConfig(Sized):
    """The alignment loss and its projector. The defaults are the papers' (``paper()``)."""

    SIZES = {"tiny": {"projector_dim": 128}, "paper": {}}

    method: str = "repa"  # repa (cosine) | videorepa (token-relation distillation)
    depth: int | None = None  # align the tokens after this block (1-based); None: REPA's 8/28 of the depth
    weight: float = 0.5  # lambda: loss = denoising + lambda * alignment
    projector_dim: int = 2048  # hidden width of the 3-layer MLP projector
    spatial_margin: float = 0.1  # VideoREPA: margin of the relations within a frame
    temporal_margin: float = 0.1  # VideoREPA: margin of the relations across frames

    HELP = {  # jobs.train's --stage2.align.FIELD help
        "method": "repa (cosine) or videorepa (token-relation distillation)",
        "depth": "align the tokens after this block (None: REPA's 8/28 of the depth)",
        "weight": "lambda: loss = denoising + lambda * alignment",
        "projector_dim": "hidden width of the MLP projector",
        "spatial_margin": "VideoREPA: margin of the relations within a frame",
        "temporal_margin": "VideoREPA: margin of the relations across frames",
    }

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"alignment method must be one of {METHODS}, got {self.method!r}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.projector_dim < 1 or self.weight < 0 or self.spatial_margin < 0 or self.temporal_margin < 0:
            raise ValueError("projector_dim must be positive; weight and margins must be >= 0")

    def depth_for(self, num_layers: int) -> int:
        depth = self.depth if self.depth is not None else max(1, round(num_layers * REPA_DEPTH_FRACTION))
        if depth > num_layers:
            raise ValueError(f"alignment depth {depth} is past the DiT's {num_layers} blocks")
        return depth


class Projector(nn.Module):
    """REPA's projector: Linear(dim, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out)."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class AlignedDiT(nn.Module):
    """The Baseline DiT plus the projector of its block-``depth`` tokens to ``num_pca_channels``.

    forward(x, c_noise, context_mask, features=None) -> F, as the Baseline DiT (features must be None);
    forward(..., aligned=True) -> (F, projected tokens [B, T, S, num_pca_channels]).
    """

    def __init__(self, dit: DiTConfig, align: AlignConfig) -> None:
        super().__init__()
        if dit.semantic:
            raise ValueError(
                "REPA and VideoREPA train the Baseline DiT (semantic=False): features enter only the alignment loss"
            )
        self.align_config = align
        self.depth = align.depth_for(dit.num_layers)
        self.dit = Re2PixDiT(dit)
        self.projector = Projector(dit.dim, align.projector_dim, dit.num_pca_channels)

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def forward(self, x, c_noise, context_mask, features=None, *, aligned: bool = False):
        if features is not None:
            raise ValueError("REPA/VideoREPA: features enter only the alignment loss, never the DiT")
        if not aligned:
            return self.dit(x, c_noise, context_mask)
        out, hidden = self.dit(x, c_noise, context_mask, hidden_block=self.depth)
        return out, self.projector(hidden)


def from_model_config(config: dict) -> AlignedDiT:
    """The model of a REPA/VideoREPA checkpoint's meta "model_config" ({"dit": ..., "align": ...}). Its
    ``.dit`` is a plain Baseline DiT: the sampler needs nothing else (``diffusion.sample(model.dit, ...)``)."""
    return AlignedDiT(DiTConfig.from_dict(config["dit"]), AlignConfig.from_dict(config["align"]))


def parameter_counts(model: AlignedDiT) -> dict[str, int]:
    """{"dit", "projector", "total"} (works on the meta device). For users sizing a model: the module
    docstring's paper-size count (the paper's "792M") is this on the meta device."""
    dit = parameter_breakdown(model.dit)["total"]
    projector = sum(p.numel() for p in model.projector.parameters())
    return {"dit": dit, "projector": projector, "total": dit + projector}


# --------------------------------------------------------------------------- losses (per sample)


def target_tokens(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The alignment target: features [B, T, Hf, Wf, C] on the token grid, [B, T, S, C] float32."""
    return features_to_grid(features.detach().float(), grid)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA: minus the mean over tokens of cos(projected, target); [B, T, S, C] each -> [B]."""
    cos = F.cosine_similarity(projected.float(), target.float(), dim=-1, eps=1e-8)
    return -cos.flatten(1).mean(dim=1)


def trd_loss(
    projected: torch.Tensor, target: torch.Tensor, spatial_margin: float = 0.1, temporal_margin: float = 0.1
) -> dict[str, torch.Tensor]:
    """VideoREPA's token-relation distillation; [B, T, S, C] each -> {"trd", "trd_spatial",
    "trd_temporal"} per sample [B] (module docstring). With T = 1 there are no temporal pairs and
    "trd_temporal" is 0."""
    b, t, s, _ = projected.shape
    h = F.normalize(projected.float().flatten(1, 2), dim=-1, eps=1e-8)  # [B, N, C'], N = T*S
    with torch.no_grad():
        f = F.normalize(target.float().flatten(1, 2), dim=-1, eps=1e-8)
        target_gram = f @ f.transpose(1, 2)  # [B, N, N]
    frame = torch.arange(t, device=h.device).repeat_interleave(s)  # frame of each token
    same = frame[:, None] == frame[None, :]  # [N, N]: spatial pairs
    margin = torch.where(same, spatial_margin, temporal_margin).to(h.dtype)
    cost = F.relu((h @ h.transpose(1, 2) - target_gram).abs() - margin)  # [B, N, N]
    n_same = t * s * s  # counted on the host: int(same.sum()) would wait for the device
    n_cross = same.numel() - n_same
    spatial = (cost * same).sum(dim=(1, 2)) / n_same
    temporal = (cost * ~same).sum(dim=(1, 2)) / max(n_cross, 1)
    return {"trd": cost.mean(dim=(1, 2)), "trd_spatial": spatial, "trd_temporal": temporal}


def alignment_terms(projected: torch.Tensor, target: torch.Tensor, align: AlignConfig) -> dict[str, torch.Tensor]:
    """Per-sample [B] values: "align_loss" (the term weighted by lambda), "align_cos" (mean token cosine,
    for both methods) and, for VideoREPA, the spatial and temporal TRD means. Computed in float32, also
    under autocast (which would run the Gram matrices' matmuls in bfloat16)."""
    with torch.autocast(projected.device.type, enabled=False):
        cos = -repa_loss(projected, target)
        if align.method == "repa":
            return {"align_loss": -cos, "align_cos": cos}
        trd = trd_loss(projected, target, align.spatial_margin, align.temporal_margin)
    return {
        "align_loss": trd["trd"],
        "align_cos": cos,
        "trd_spatial": trd["trd_spatial"],
        "trd_temporal": trd["trd_temporal"],
    }


def training_loss(
    model,
    latents: torch.Tensor,
    features: torch.Tensor,
    align: AlignConfig,
    context_latents: int = 4,
    generator: torch.Generator | None = None,
    *,
    patch: int = 2,
):
    """Denoising loss + lambda * alignment loss for an ``AlignedDiT`` (or DDP around one).

    latents [B, 16, T, h, w]; features [B, T, Hf, Wf, C] go to the target only (the denoiser is called
    with features=None). Returns (loss, logs) with per-sample logs "denoising_loss", "align_loss",
    "align_cos" (and "trd_spatial", "trd_temporal" for VideoREPA)."""
    captured: list[torch.Tensor] = []

    def network(x, c_noise, mask, feats):
        out, projected = model(x, c_noise, mask, feats, aligned=True)
        captured.append(projected)
        return out

    denoising, logs = diffusion.training_loss(network, latents, None, context_latents, generator)
    grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
    terms = alignment_terms(captured[0], target_tokens(features, grid), align)
    loss = denoising + align.weight * terms["align_loss"].mean()
    return loss, {"denoising_loss": logs["loss_per_sample"], **{k: v.detach() for k, v in terms.items()}}
