"""Depth Anything V2 as the cache job's optional pseudo-depth target (`--pseudo-depth SPEC`).

The paper trains and scores its depth head on pseudo-depth from Depth Anything V2 (Cityscapes and nuScenes
have no dense depth). The model runs on the feature frames the feature encoder sees (its input size, rounded
to the model's patch size), and its output, relative inverse depth (disparity, up to an unknown scale and
shift: the "relative" checkpoints' ReLU output), is resized (bilinear, antialiased) to a small multiple of
the feature grid and stored as float16 in frames/pseudo_depth (pipeline/store/writer.py).
"""

from __future__ import annotations

import torch

from ..frames import resize
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, to_nchw_float
from .hashing import EncoderWeightsError, HashedWeights, load_pretrained

DEFAULT_WEIGHTS = "depth-anything/Depth-Anything-V2-Small-hf"


def model_input_hw(frame_hw, patch_size: int) -> tuple[int, int]:
    """The feature encoder's input size rounded to whole patches of the depth model (at least one)."""
    return tuple(max(patch_size, round(int(s) / patch_size) * patch_size) for s in frame_hw)


class PseudoDepth(HashedWeights):
    """`model(frames)`: uint8 [B, H, W, 3] -> relative disparity [B, *out_hw] float32 on the CPU."""

    name = "depth_anything"

    def __init__(
        self,
        model,
        *,
        frame_hw,
        out_hw,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
        weights_id: str = "",
        revision: str | None = None,
    ):
        cfg = model.config
        if getattr(cfg, "depth_estimation_type", "relative") != "relative":
            raise EncoderWeightsError(
                f"{weights_id}: a metric Depth Anything checkpoint; --pseudo-depth takes a relative one "
                f"(e.g. {DEFAULT_WEIGHTS})"
            )
        self.patch_size = int(cfg.patch_size)
        self.input_hw = model_input_hw(frame_hw, self.patch_size)
        self.out_hw = tuple(int(s) for s in out_hw)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.mean_rgb, self.std_rgb = [float(v) for v in mean], [float(v) for v in std]
        self._mean = torch.tensor(self.mean_rgb, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std_rgb, device=self.device).view(1, 3, 1, 1)
        self.weights_id, self.revision = weights_id, revision

    @torch.inference_mode()
    def __call__(self, frames) -> torch.Tensor:
        x = (resize(to_nchw_float(frames, self.device), self.input_hw) - self._mean) / self._std
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            disparity = self.model(pixel_values=x).predicted_depth  # [B, *input_hw]
        return resize(disparity.float()[:, None], self.out_hw)[:, 0].cpu()  # [B, *out_hw]

    def describe(self) -> dict:
        """What the store manifest records about the model (under "pseudo_depth")."""
        return {
            **self.weights_identity(self.model),
            "input_size": list(self.input_hw),
            "patch_size": self.patch_size,
            "resize": "bilinear-antialias-nocrop",
            "normalization": {"mean": self.mean_rgb, "std": self.std_rgb},
        }


def load_pseudo_depth(
    spec: str,
    frame_hw,
    out_hw,
    device="cpu",
    *,
    autocast_dtype: torch.dtype | None = None,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> PseudoDepth:
    """`transformers.DepthAnythingForDepthEstimation` from a hub id (local Hugging Face cache only unless
    allow_download) or a local folder; pixel statistics from its preprocessor config when it has one."""
    from transformers import DepthAnythingForDepthEstimation

    from .backbones import pixel_stats

    model, local, weights_id, rev = load_pretrained(
        DepthAnythingForDepthEstimation,
        spec,
        "Depth Anything weights",
        flag="--pseudo-depth",
        allow_download=allow_download,
        revision=revision,
        cache_dir=cache_dir,
    )
    mean, std = pixel_stats(local, (IMAGENET_MEAN, IMAGENET_STD))
    return PseudoDepth(
        model,
        frame_hw=frame_hw,
        out_hw=out_hw,
        mean=mean,
        std=std,
        device=device,
        autocast_dtype=autocast_dtype,
        weights_id=weights_id,
        revision=rev,
    )
