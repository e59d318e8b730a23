"""Trained-looking checkpoints of every stage, written in the trainer's format, for inference tests."""

from __future__ import annotations

import torch

from model.checkpoint import save_checkpoint
from model.stage1 import MaskedFeatureTransformer, Stage1Config
from model.stage2 import DiTConfig, Re2PixDiT


def perturb(model, seed):
    """Fresh models predict zeros (zero-initialised outputs): give them random, non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_runs(root, stage1_channels=64, stage2_channels=64, manifest=None):
    """Stage 1, Stage 2 and Baseline checkpoints in the trainer's format (model/checkpoint.py); with a store's
    `manifest`, each records that store's feature space as the trainer does (without, they are as checkpoints
    saved before the record)."""
    from model.checkpoint import feature_space

    def meta(task, config, channels):
        space = {"feature_space": feature_space(manifest, channels)} if manifest is not None else {}
        return {"task": task, "model_config": config, **space}

    s1 = perturb(MaskedFeatureTransformer(Stage1Config.tiny(num_pca_channels=stage1_channels)), 1)
    save_checkpoint(
        root / "stage1",
        1,
        model=s1,
        state={},
        meta=meta("stage1", s1.config.to_dict(), stage1_channels),
    )
    for task, semantic in (("stage2", True), ("baseline", False)):
        m = perturb(Re2PixDiT(DiTConfig.tiny(semantic=semantic, num_pca_channels=stage2_channels)), 2)
        save_checkpoint(root / task, 1, model=m, state={}, meta=meta(task, m.cfg.to_dict(), stage2_channels))
    return {k: str(root / k) for k in ("stage1", "stage2", "baseline")}


# Stand-ins for the FID / FVD networks a user gives by path (TorchScript), same call conventions
class MeanColour(torch.nn.Module):
    """Stands in for a TorchScript Inception (StyleGAN3 / clean-fid call convention)."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class MeanClip(torch.nn.Module):
    """Stands in for StyleGAN-V's TorchScript I3D."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        return torch.cat(
            [x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), x[:, :, 1:].sub(x[:, :, :-1]).abs().mean(dim=(2, 3, 4))],
            dim=1,
        )
