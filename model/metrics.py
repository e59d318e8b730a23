"""Feature metrics for Stage 1: per future frame, MSE and cosine similarity of predicted PCA features
against the cached ground truth, over all channels and over the first 8/64/256/1152 PCA channels, and
the forecast's sharpness: its spatial gradient energy over the truth's (below 1: smoother than the truth).

PCA channels are ordered by explained variance, so a prefix score says how well the coarse structure
is forecast. Means are accumulated as (sum, count) so that ranks can add theirs before dividing.

Example:
    means = Means()
    means.update(feature_metrics(pred, target, first_frame=4))   # pred, target [B, 3, H, W, C]
    means.all_reduce(); means.compute()   # {"mse": ..., "cos@64": ..., "t4/mse@8": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PCA_PREFIXES = (8, 64, 256, 1152)


def channel_prefixes(channels: int) -> list[int]:
    """The paper's prefixes that fit in `channels` (the full width is reported as the plain name)."""
    return [k for k in PCA_PREFIXES if k <= channels]


def feature_metrics(pred: torch.Tensor, target: torch.Tensor, first_frame: int = 4) -> dict[str, torch.Tensor]:
    """Per-sample values [B] for pred, target [B, F, H, W, C] (F future frames, latent indices
    first_frame..first_frame+F-1). Keys: `t{i}/mse`, `t{i}/cos` (all C channels), `t{i}/mse@k`,
    `t{i}/cos@k` for each prefix k, and the same without `t{i}/` averaged over the future frames.
    MSE is the mean squared error per element; cos is the mean over tokens of the cosine similarity
    of the channel vectors."""
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, F, H, W, C]")
    pred, target = pred.float(), target.float()
    c = pred.shape[-1]
    out: dict[str, torch.Tensor] = {}
    for name, k in [("", c)] + [(f"@{k}", k) for k in channel_prefixes(c)]:
        p, t = pred[..., :k], target[..., :k]
        mse = (p - t).pow(2).mean(dim=(2, 3, 4))  # [B, F]
        cos = F.cosine_similarity(p, t, dim=-1, eps=1e-8).mean(dim=(2, 3))  # [B, F]
        for f in range(pred.shape[1]):
            out[f"t{first_frame + f}/mse{name}"] = mse[:, f]
            out[f"t{first_frame + f}/cos{name}"] = cos[:, f]
        out[f"mse{name}"] = mse.mean(dim=1)
        out[f"cos{name}"] = cos.mean(dim=1)
    sharpness = gradient_energy(pred) / gradient_energy(target).clamp_min(1e-12)  # [B, F]
    for f in range(pred.shape[1]):
        out[f"t{first_frame + f}/sharpness"] = sharpness[:, f]
    out["sharpness"] = sharpness.mean(dim=1)
    return out


def gradient_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient (finite differences along H and W) of x [B, F, H, W, C]: [B, F]."""
    dy, dx = x[:, :, 1:] - x[:, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1]
    return dy.pow(2).mean(dim=(2, 3, 4)) + dx.pow(2).mean(dim=(2, 3, 4))


class Means:
    """Running means of per-sample values, reducible across DDP ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, torch.Tensor], prefix: str = "") -> None:
        for key, v in values.items():
            v = v.detach().double().reshape(-1)
            name = prefix + key
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
            self.counts[name] = self.counts.get(name, 0) + v.numel()

    def all_reduce(self) -> None:
        """Sum every rank's sums and counts (a rank that saw no samples takes part with zeros)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.sums))
        keys = sorted(set().union(*gathered))
        for k in keys:
            self.sums.setdefault(k, 0.0)
            self.counts.setdefault(k, 0)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        buf = torch.tensor([[self.sums[k], self.counts[k]] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(buf)
        for k, (s, n) in zip(keys, buf.tolist()):
            self.sums[k], self.counts[k] = s, int(n)

    def compute(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums) if self.counts[k]}
