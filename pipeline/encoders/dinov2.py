"""DINOv2-Reg feature encoder: frames -> concatenated, layer-normed patch tokens of blocks (3, 6, 9, 12).

Hugging Face `hidden_states[0]` is the embedding output and `hidden_states[i]` is block i's
un-normed output; like DINOv2's own `get_intermediate_layers(norm=True)`, each chosen block's tokens
pass through the model's final `layernorm`, then CLS and register tokens are dropped.
Frames are resized (bilinear, antialiased, no crop) to `input_hw`; position embeddings are
interpolated by transformers (bicubic, antialiased, to the exact patch grid, as the original
DINOv2-Reg models do), which works for non-square grids such as 32 x 56.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from ..frames import resize
from ..store.geometry import PAPER, TINY
from .hashing import HashedWeights, load_demo_model, load_pretrained, seeded

if TYPE_CHECKING:  # transformers is imported only when a model is built or loaded
    from transformers import Dinov2WithRegistersModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_WEIGHTS = "facebook/dinov2-with-registers-base"
# tiny preset: same architecture from a small random config (CPU demo and tests); matches geometry.TINY
TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 70,
    "num_register_tokens": 4,
}
TINY_SEED = 0
# demo preset: the tiny architecture TRAINED on the synthetic set's class maps and depth by
# `python scripts/train_demo_dinov2.py` (weights/demo_dinov2.{safetensors,json}): semantic patch features
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_dinov2"
# input sizes from the geometry presets (pipeline/store/geometry.py), so that the two never disagree
PRESETS = {
    "tiny": {"input_hw": TINY.dino_input_hw, "layers": (1, 2, 3, 4)},
    "demo": {"input_hw": TINY.dino_input_hw, "layers": (1, 2, 3, 4)},
    "default": {"input_hw": PAPER.dino_input_hw, "layers": (3, 6, 9, 12)},
}


def to_nchw_float(frames, device) -> torch.Tensor:
    """RGB uint8 frames [B, H, W, 3] (numpy or torch) -> float [B, 3, H, W] in [0, 1] on `device`."""
    frames = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [B, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames.to(device).permute(0, 3, 1, 2).float() / 255.0  # move as uint8, convert on device


def checked_grid(input_hw, layers, patch_size: int, num_layers: int) -> tuple[tuple, tuple]:
    """(input_hw, layers) as int tuples, refused unless the input is whole patches and the layers are
    1-based block indices of the model."""
    input_hw, layers = tuple(int(s) for s in input_hw), tuple(int(i) for i in layers)
    if any(s % patch_size for s in input_hw):
        raise ConfigError(
            f"input_hw {input_hw} must be multiples of the patch size {patch_size}: this encoder's patches are "
            f"{patch_size} pixels, so choose a --geometry whose dino_input_hw is whole patches of it"
        )
    if not layers or not all(1 <= i <= num_layers for i in layers):
        raise ConfigError(f"layers {layers} must be 1-based block indices in 1..{num_layers}")
    return input_hw, layers


IMAGENET_NORMALIZATION = {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def feature_record(encoder, module, layernorm: str, normalization: dict) -> dict:
    """The manifest record every feature encoder starts with (DINOv2, the image and video backbones)."""
    return {
        **encoder.weights_identity(module),
        "input_size": list(encoder.input_hw),
        "layers": list(encoder.layers),
        "layernorm": layernorm,
        "tokens": "patch",
        "resize": "bilinear-antialias-nocrop",
        "normalization": normalization,
        "patch_size": encoder.patch_size,
        "feature_dim": encoder.feature_dim,
    }


class DinoV2Encoder(HashedWeights):
    """Frozen DINOv2-Reg. `encoder(frames)` -> features [B, h, w, len(layers) * hidden] float32 on `device`."""

    name = "dinov2_with_registers"

    def __init__(
        self,
        model: Dinov2WithRegistersModel,
        *,
        input_hw=(448, 784),
        layers=(3, 6, 9, 12),
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
        weights_id: str = "",
        revision: str | None = None,
    ):
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.input_hw, self.layers = checked_grid(input_hw, layers, self.patch_size, cfg.num_hidden_layers)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.num_register_tokens = int(cfg.num_register_tokens)
        self.feature_dim = len(self.layers) * int(cfg.hidden_size)
        self.weights_id, self.revision = weights_id, revision
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def grid_hw(self) -> tuple[int, int]:  # (32, 56) at 448 x 784
        return tuple(s // self.patch_size for s in self.input_hw)

    def preprocess(self, frames) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> pixel_values [B, 3, *input_hw], ImageNet-normalized."""
        x = resize(to_nchw_float(frames, self.device), self.input_hw)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def __call__(self, frames) -> torch.Tensor:
        pixel_values = self.preprocess(frames)
        b, (h, w) = pixel_values.shape[0], self.grid_hw
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            skip = 1 + self.num_register_tokens  # CLS, then registers, then h*w patch tokens
            feats = [self.model.layernorm(hidden[i])[:, skip:] for i in self.layers]
        return torch.cat(feats, dim=-1).float().reshape(b, h, w, self.feature_dim)  # [B, h, w, D]

    def describe(self) -> dict:
        """What the store manifest records about this encoder."""
        d = feature_record(self, self.model, "final", IMAGENET_NORMALIZATION)
        if self.weights_id == "tiny":
            d["config"] = {**TINY_CONFIG, "seed": TINY_SEED}
        if self.weights_id == "demo":
            d["config"] = {k: getattr(self.model.config, k) for k in TINY_CONFIG}
        return d


def tiny_dinov2_model() -> Dinov2WithRegistersModel:
    """The tiny preset's model: deterministic random weights (same seed -> same sha256)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return seeded(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_CONFIG)), TINY_SEED)


def demo_dinov2_model(stem: Path = DEMO_WEIGHTS) -> Dinov2WithRegistersModel:
    """The demo preset's trained model from weights/demo_dinov2.{safetensors,json} (no pickle)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return load_demo_model(
        stem,
        lambda config: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config)),
        what="DINOv2",
        train="scripts/train_demo_dinov2.py",
        took="a few minutes on the CPU",
    )


def load_dinov2(
    spec: str = DEFAULT_WEIGHTS,
    input_hw=None,
    layers=None,
    device="cpu",
    *,
    autocast_dtype: torch.dtype | None = None,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> DinoV2Encoder:
    """spec: "tiny" (random), "demo" (trained on the synthetic set), a hub id (looked up in the local HF cache
    unless allow_download) or a local folder.

    input_hw / layers default to the preset's: tiny (112, 196) / (1, 2, 3, 4), else (448, 784) / (3, 6, 9, 12).
    """
    preset = PRESETS[spec if spec in ("tiny", "demo") else "default"]
    input_hw, layers = input_hw or preset["input_hw"], layers or preset["layers"]
    if spec == "tiny":
        model, weights_id, rev = tiny_dinov2_model(), "tiny", None
    elif spec == "demo":
        model, weights_id, rev = demo_dinov2_model(), "demo", None
    else:
        from transformers import Dinov2WithRegistersModel

        model, _, weights_id, rev = load_pretrained(
            Dinov2WithRegistersModel,
            spec,
            "DINOv2-Reg weights",
            flag="--dinov2",
            allow_download=allow_download,
            revision=revision,
            cache_dir=cache_dir,
        )
    return DinoV2Encoder(
        model,
        input_hw=input_hw,
        layers=layers,
        device=device,
        autocast_dtype=autocast_dtype,
        weights_id=weights_id,
        revision=rev,
    )
