"""DPT heads for the semantic evaluation (paper appendix 9.3) and the metrics of their outputs.

The head is Depth Anything's ``DPTHead`` (Ranftl et al.'s DPT as Depth Anything implements it) in
the paper's configuration: feature width 256, ``out_channels = [128, 256, 512, 512]``, inputs the
four 768-d block features of DINOv2-Reg ViT-B (blocks 3, 6, 9, 12, patch tokens after the final
LayerNorm: exactly the 3072-d features the store holds before PCA, split into four). Per block: a
1x1 projection to out_channels[i], resampling to 4x, 2x, 1x and 1/2x of the patch grid (transposed
convolutions and a strided convolution), a 3x3 conv to 256 (no bias), then four RefineNet fusion
blocks (two residual conv units each, bilinear upsampling with align_corners=True) from the
coarsest up, and the output convs: 3x3 256 -> 128, bilinear resize to the input resolution
(patch grid x 14), 3x3 128 -> 32, ReLU, 1x1 32 -> classes. No activation after it: the classes are
logits (19 Cityscapes trainIds, or 256 depth bins: depth is a classification of quantised
pseudo-depth; a depth map is the softmax expectation of the bin centres).

From Stage 1's PCA features, the inputs are ``PCABasis.unproject`` (the rank-c estimate of the
3072-d features) followed by :func:`split_blocks`.

Checkpoints are safetensors files with the config as JSON in the metadata (``save_head`` /
``load_head``); nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import InferenceError

__all__ = [
    "MOVING_CLASSES",
    "DPTConfig",
    "DPTHead",
    "depth_metrics",
    "load_head",
    "miou",
    "save_head",
    "segmentation_confusion",
    "split_blocks",
]

MOVING_CLASSES = tuple(range(11, 19))  # Cityscapes trainIds: person, rider, car, truck, bus, train, motorcycle, bicycle
IGNORE_INDEX = 255
FORMAT = "re2pix-dpt-head"


@dataclass
class DPTConfig:
    task: str = "segmentation"  # "segmentation" (19 classes) or "depth" (num_classes bins)
    in_dim: int = 768  # width of each block's features
    num_blocks: int = 4
    features: int = 256
    out_channels: tuple[int, ...] = (128, 256, 512, 512)
    num_classes: int = 19
    patch_size: int = 14  # outputs come at patch grid x patch_size
    depth_min: float = 0.001  # depth bins (task "depth"): centres between depth_min and depth_max,
    depth_max: float = 80.0  # spaced "linear" or "log"; in the units of the depth labels
    depth_spacing: str = "log"

    def __post_init__(self):
        self.out_channels = tuple(int(c) for c in self.out_channels)
        if self.task not in ("segmentation", "depth"):
            raise ValueError(f"task must be 'segmentation' or 'depth', got {self.task!r}")
        if self.num_blocks != 4 or len(self.out_channels) != 4:
            raise ValueError("the DPT head takes exactly four blocks with four out_channels")
        if self.depth_spacing not in ("linear", "log") or not 0 <= self.depth_min < self.depth_max:
            raise ValueError("depth bins need 0 <= depth_min < depth_max and spacing 'linear' or 'log'")
        if self.depth_spacing == "log" and self.depth_min == 0:  # linear bins from 0: normalized disparity
            raise ValueError("log-spaced depth bins need depth_min > 0")

    @classmethod
    def paper(cls, task: str = "segmentation", **overrides) -> DPTConfig:
        """Appendix 9.3: features 256, out channels [128, 256, 512, 512], 19 classes or 256 bins."""
        return cls(task=task, num_classes=19 if task == "segmentation" else 256, **overrides)

    @classmethod
    def tiny(cls, task: str = "segmentation", **overrides) -> DPTConfig:
        """For the tiny DINOv2 (32-d blocks) in tests and demos."""
        values = {
            "in_dim": 32,
            "features": 16,
            "out_channels": (8, 16, 32, 32),
            "num_classes": 19 if task == "segmentation" else 16,
        }
        return cls(task=task, **{**values, **overrides})

    def bin_centres(self) -> torch.Tensor:
        edges = torch.linspace(0, 1, self.num_classes + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2
        if self.depth_spacing == "linear":
            return (self.depth_min + mids * (self.depth_max - self.depth_min)).float()
        lo, hi = math.log(self.depth_min), math.log(self.depth_max)
        return torch.exp(lo + mids * (hi - lo)).float()


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class _FusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = _ResidualConvUnit(features)
        self.resConfUnit2 = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)

    def forward(self, x, skip=None, size=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        kwargs = {"size": tuple(size)} if size is not None else {"scale_factor": 2}
        x = F.interpolate(x, **kwargs, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Scratch(nn.Module):
    def __init__(self, cfg: DPTConfig):
        super().__init__()
        for i, c in enumerate(cfg.out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, cfg.features, 3, padding=1, bias=False))
            setattr(self, f"refinenet{i}", _FusionBlock(cfg.features))
        half = cfg.features // 2
        self.output_conv1 = nn.Conv2d(cfg.features, half, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(half, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, cfg.num_classes, 1)
        )


class DPTHead(nn.Module):
    """``head(blocks)``: four [B, in_dim, h, w] maps -> logits [B, classes, h * patch, w * patch]."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        oc = cfg.out_channels
        self.projects = nn.ModuleList(nn.Conv2d(cfg.in_dim, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = _Scratch(cfg)

    def forward(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        if len(blocks) != 4:
            raise ValueError(f"expected 4 block feature maps, got {len(blocks)}")
        h, w = blocks[0].shape[-2:]
        layers = [rs(pr(x)) for x, pr, rs in zip(blocks, self.projects, self.resize_layers)]
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1))
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1)
        out = s.output_conv1(path)
        p = self.cfg.patch_size
        out = F.interpolate(out, size=(h * p, w * p), mode="bilinear", align_corners=True)
        return s.output_conv2(out)

    def predict(self, blocks: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class maps [B, H, W] (segmentation) or depth maps [B, H, W] (expected bin centre), resized
        bilinearly to `size` (e.g. the label's) before the argmax / expectation."""
        logits = self(blocks)
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        if self.cfg.task == "segmentation":
            return logits.argmax(dim=1)
        centres = self.cfg.bin_centres().to(logits.device)
        return torch.einsum("bkhw,k->bhw", logits.float().softmax(dim=1), centres)


def split_blocks(features: torch.Tensor, num_blocks: int = 4) -> list[torch.Tensor]:
    """Concatenated block features [B, h, w, num_blocks * C] -> num_blocks maps [B, C, h, w]."""
    if features.shape[-1] % num_blocks:
        raise ValueError(f"{features.shape[-1]} feature channels do not split into {num_blocks} blocks")
    return [x.permute(0, 3, 1, 2).contiguous() for x in features.chunk(num_blocks, dim=-1)]


def save_head(path, head: DPTHead) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(head.cfg).items()}
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})
    return path


def load_head(path, device="cpu", task: str | None = None) -> DPTHead:
    """A head from a safetensors file written by :func:`save_head`; `task` checks what it is for."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"DPT head {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise InferenceError(
            f"{path} is not a re2pix DPT head (safetensors metadata needs format={FORMAT!r} and a "
            "config; write heads with inference.dpt.save_head)"
        )
    values = json.loads(meta["config"])
    unknown = set(values) - {f.name for f in fields(DPTConfig)}
    if unknown:
        raise InferenceError(f"{path}: unknown DPT config fields {sorted(unknown)}")
    head = DPTHead(DPTConfig(**values))
    if task is not None and head.cfg.task != task:
        raise InferenceError(f"{path} is a {head.cfg.task} head, not a {task} one")
    head.load_state_dict(load_file(str(path)))
    return head.to(device).eval()


# --------------------------------------------------------------------------- metrics


def segmentation_confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int = 19) -> torch.Tensor:
    """Confusion counts [num_classes (label), num_classes (pred)] int64; label 255 is ignored."""
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
    idx = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def miou(confusion: torch.Tensor, classes=None) -> float:
    """Mean IoU over `classes` (default all) of a dataset-level confusion matrix; a class absent from
    both labels and predictions is left out of the mean (nan if every class is), and so is a class
    beyond the matrix (Cityscapes' moving trainIds 11-18 under a head of fewer classes)."""
    c = confusion.double()
    inter = c.diag()
    union = c.sum(0) + c.sum(1) - inter
    n = c.shape[0]
    idx = torch.arange(n) if classes is None else torch.tensor([k for k in classes if 0 <= k < n], dtype=torch.long)
    inter, union = inter[idx], union[idx]
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def depth_metrics(pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over valid pixels (label > 0 and finite) for AbsRel = mean |d - d*| / d* and
    delta1 = mean[max(d / d*, d* / d) < 1.25]: {"absrel_sum", "delta1_sum", "count"} (float64)."""
    pred, label = pred.double().reshape(-1), label.double().reshape(-1).to(pred.device)
    valid = torch.isfinite(label) & (label > 0)
    p, t = pred[valid].clamp(min=1e-6), label[valid]
    ratio = torch.maximum(p / t, t / p)
    return {
        "absrel_sum": ((p - t).abs() / t).sum().cpu(),
        "delta1_sum": (ratio < 1.25).double().sum().cpu(),
        "count": torch.tensor(float(valid.sum()), dtype=torch.float64),
    }
