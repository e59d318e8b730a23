"""Frozen `transformers` image backbones beyond DINOv2-Reg: SigLIP-2 and any ViT-like vision model.

A backbone is a model whose forward takes `pixel_values` [B, 3, H, W] and returns `hidden_states`
(`hidden_states[0]` the embeddings, `hidden_states[i]` block i's output). Its features are the
chosen blocks' patch tokens, each through the model's final norm (as DinoV2Encoder does, and as
a ViT's own readout does), concatenated: [B, h, w, len(layers) * hidden]. Prefix tokens (CLS,
registers) are whatever precedes the last h * w tokens, so any count of them is dropped alike.

SigLIP-2 at fixed resolution (e.g. google/siglip2-base-patch16-224) has SigLIP's architecture:
it loads as `SiglipVisionModel` (from the vision tower of a full SigLIP checkpoint too) and sees
pixels scaled to [-1, 1] (mean = std = 0.5). Position embeddings are interpolated to the patch grid.
"""

from __future__ import annotations

import inspect
import json

import torch

from ..frames import resize
from ..store.geometry import TINY
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, checked_grid, feature_record, to_nchw_float
from .hashing import EncoderWeightsError, HashedWeights, backbone_weights, load_pretrained, seeded

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# tiny presets: small random configs of the real architectures, sized to fit geometry.TINY
# (112 x 196 input, patch 14 -> 8 x 14 grid, 4 blocks x 32 = 128-d features)
TINY_SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 70,
}
TINY_SEED = 0
SIGLIP2_DEFAULT = "google/siglip2-base-patch16-224"
# the final norm's attribute on the module that holds the encoder, by convention of each family
_FINAL_NORMS = ("layernorm", "post_layernorm", "norm", "ln_post")


class ImageBackbone(HashedWeights):
    """`encoder(frames)` uint8 [B, H, W, 3] -> features [B, h, w, len(layers) * hidden] float32 on `device`."""

    def __init__(
        self,
        model,
        *,
        name: str,
        input_hw,
        layers,
        mean,
        std,
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
        weights_id: str = "",
        revision: str | None = None,
        tiny_config: dict | None = None,
    ):
        cfg = model.config
        self.name = name
        self.patch_size = int(cfg.patch_size)
        self.input_hw, self.layers = checked_grid(input_hw, layers, self.patch_size, cfg.num_hidden_layers)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.norm, self.norm_name = _final_norm(self.model)
        self.feature_dim = len(self.layers) * int(cfg.hidden_size)
        self.mean_rgb, self.std_rgb = [float(v) for v in mean], [float(v) for v in std]
        self._mean = torch.tensor(self.mean_rgb, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std_rgb, device=self.device).view(1, 3, 1, 1)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.weights_id, self.revision, self.tiny_config = weights_id, revision, tiny_config

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(s // self.patch_size for s in self.input_hw)

    @torch.inference_mode()
    def __call__(self, frames) -> torch.Tensor:
        x = (resize(to_nchw_float(frames, self.device), self.input_hw) - self._mean) / self._std
        b, (h, w) = x.shape[0], self.grid_hw
        kw = {"interpolate_pos_encoding": True} if self._interpolate else {}
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            hidden = self.model(pixel_values=x, output_hidden_states=True, **kw).hidden_states
            feats = [self.norm(hidden[i])[:, -h * w :] for i in self.layers]  # prefix tokens dropped
        return torch.cat(feats, dim=-1).float().reshape(b, h, w, self.feature_dim)

    def describe(self) -> dict:
        """What the store manifest records about this encoder (same keys as DinoV2Encoder's)."""
        d = feature_record(self, self.model, self.norm_name, {"mean": self.mean_rgb, "std": self.std_rgb})
        if self.tiny_config is not None:
            d["config"] = self.tiny_config
        return d


def _final_norm(model):
    """The final norm a backbone's own readout applies (identity when it has none)."""
    for holder in (model, getattr(model, "vision_model", None)):
        for attr in _FINAL_NORMS:
            mod = getattr(holder, attr, None) if holder is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod, attr
    return torch.nn.Identity(), "none"


def tiny_siglip_model():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return seeded(lambda: SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)), TINY_SEED)


def _even_layers(num_layers: int, n: int = 4) -> tuple[int, ...]:
    """n blocks evenly spaced ending at the last: 12 layers -> (3, 6, 9, 12), as DINOv2's default."""
    n = min(n, num_layers)
    return tuple(round(num_layers * (i + 1) / n) for i in range(n))


def pixel_stats(folder, default):
    """image_mean / image_std from a checkpoint's preprocessor_config.json, else `default`."""
    f = folder / "preprocessor_config.json"
    try:
        p = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError) as e:
        raise EncoderWeightsError(f"{f}: unreadable preprocessor config: {e}") from e
    mean, std = p.get("image_mean", list(default[0])), p.get("image_std", list(default[1]))
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise EncoderWeightsError(f"{f}: image_mean / image_std must be lists of 3 numbers")
    return mean, std


def load_siglip2(
    spec: str = SIGLIP2_DEFAULT,
    input_hw=None,
    layers=None,
    device="cpu",
    *,
    autocast_dtype=None,
    allow_download=False,
    revision=None,
    cache_dir=None,
) -> ImageBackbone:
    """SigLIP-2's vision tower: "tiny" (random), a hub id or a local folder (vision or full SigLIP checkpoint)."""
    where = {"allow_download": allow_download, "revision": revision, "cache_dir": cache_dir}
    tiny_config = {**TINY_SIGLIP, "seed": TINY_SEED}
    model, local, wid, rev, tiny = backbone_weights(
        spec, tiny_siglip_model, tiny_config, "SiglipVisionModel", "SigLIP weights", **where
    )
    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if local is None else pixel_stats(local, (SIGLIP_MEAN, SIGLIP_STD))
    p = int(model.config.patch_size)
    if input_hw is None:  # tiny: geometry.TINY's; else a 28 x 48 grid (448 x 768 at patch 16)
        input_hw = TINY.dino_input_hw if spec == "tiny" else (28 * p, 48 * p)
    return ImageBackbone(
        model,
        name="siglip2",
        input_hw=input_hw,
        layers=layers or _even_layers(model.config.num_hidden_layers),
        mean=mean,
        std=std,
        device=device,
        autocast_dtype=autocast_dtype,
        weights_id=wid,
        revision=rev,
        tiny_config=tiny,
    )


def load_hf_backbone(
    spec: str,
    input_hw=None,
    layers=None,
    device="cpu",
    *,
    autocast_dtype=None,
    allow_download=False,
    revision=None,
    cache_dir=None,
) -> ImageBackbone:
    """Any transformers vision backbone (AutoModel) by hub id or local folder; the vision tower of a
    two-tower checkpoint (CLIP, SigLIP) is taken. Pixel statistics from its preprocessor config."""
    from transformers import AutoModel

    model, local, wid, rev = load_pretrained(
        AutoModel,
        spec,
        "a transformers model",
        flag="--encoder",
        allow_download=allow_download,
        revision=revision,
        cache_dir=cache_dir,
    )
    if hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
        model = model.vision_model  # two-tower: keep the image tower
        model.config = model.config if hasattr(model.config, "patch_size") else model.config.vision_config
    if not hasattr(model.config, "patch_size") or not hasattr(model.config, "num_hidden_layers"):
        raise EncoderWeightsError(
            f"{local}: {type(model).__name__} is not a ViT-like vision backbone "
            "(its config has no patch_size / num_hidden_layers)"
        )
    mean, std = pixel_stats(local, (IMAGENET_MEAN, IMAGENET_STD))
    p = int(model.config.patch_size)
    return ImageBackbone(
        model,
        name=f"hf:{model.config.model_type}",
        input_hw=input_hw or (32 * p, 56 * p),
        layers=layers or _even_layers(model.config.num_hidden_layers),
        mean=mean,
        std=std,
        device=device,
        autocast_dtype=autocast_dtype,
        weights_id=wid,
        revision=rev,
    )
