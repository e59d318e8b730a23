"""A frozen video backbone (V-JEPA 2, `transformers`' VJEPA2Model encoder) as the feature encoder.

Alignment to the clip's feature frames. The store keeps one feature row per feature frame, shared by
every clip that uses it, so a row's input may depend only on its scene: feature frame f is encoded
from the window of the `window` scene frames ending at f (f - window + 1 .. f; at the start of a
scene the first frame is repeated). V-JEPA 2 cuts the window into temporal tubes of `tubelet_size`
frames; the row's features are the chosen blocks' tokens, each through the encoder's final
LayerNorm, averaged over the window's tubes: [h, w, len(layers) * hidden]. With the default window
of 4 (the WAN VAE's temporal factor), feature row t of a clip describes frames 4t-3 .. 4t, the
frames latent t holds (latent 0 holds frame 0 alone; its row sees the 3 scene frames before too,
or frame 0 repeated at a scene's start).

V-JEPA 2's rotary positions assume a square grid of crop_size / patch_size: input_hw must be
(crop_size, crop_size), e.g. `--geometry '{"dino_input_hw": [256, 256]}'` for a 256-crop model.
"""

from __future__ import annotations

import torch

from ..frames import resize
from .dinov2 import IMAGENET_MEAN, IMAGENET_NORMALIZATION, IMAGENET_STD, feature_record, to_nchw_float
from .hashing import HashedWeights, backbone_weights, seeded

VJEPA2_DEFAULT = "facebook/vjepa2-vitl-fpc64-256"
# tiny preset: V-JEPA 2's architecture at a small width; 112 x 112 crop, patch 16 -> 7 x 7, 4 x 32 = 128-d
TINY_VJEPA2 = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "crop_size": 112,
    "patch_size": 16,
    "tubelet_size": 2,
    "frames_per_clip": 4,
    "pred_hidden_size": 16,
    "pred_num_hidden_layers": 1,
    "pred_num_attention_heads": 2,
    "num_pooler_layers": 1,
}
TINY_SEED = 0
DEFAULT_WINDOW = 4


class VideoBackbone(HashedWeights):
    """`encoder(windows)` uint8 [B, window, H, W, 3] (oldest frame first) -> features [B, h, w, D] float32."""

    name = "vjepa2"

    def __init__(
        self,
        model,
        *,
        input_hw=None,
        layers=None,
        window: int = DEFAULT_WINDOW,
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
        weights_id: str = "",
        revision: str | None = None,
        tiny_config: dict | None = None,
    ):
        cfg = model.config
        self.patch_size, self.tubelet_size = int(cfg.patch_size), int(cfg.tubelet_size)
        crop = int(cfg.crop_size)
        self.input_hw = tuple(int(s) for s in (input_hw or (crop, crop)))
        if self.input_hw != (crop, crop):
            raise ValueError(
                f"input_hw {self.input_hw}: V-JEPA 2's rotary positions assume its square "
                f"{crop} x {crop} crop; set the geometry's dino_input_hw to [{crop}, {crop}]"
            )
        n = int(cfg.num_hidden_layers)
        self.layers = tuple(int(i) for i in (layers or [round(n * (i + 1) / 4) for i in range(min(4, n))]))
        if not self.layers or not all(1 <= i <= n for i in self.layers):
            raise ValueError(f"layers {self.layers} must be 1-based block indices in 1..{n}")
        self.window = int(window)
        if self.window < 1 or self.window % self.tubelet_size:
            raise ValueError(
                f"window {self.window} must be a positive multiple of the tubelet size {self.tubelet_size}"
            )
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.feature_dim = len(self.layers) * int(cfg.hidden_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 1, 3, 1, 1)
        self.weights_id, self.revision, self.tiny_config = weights_id, revision, tiny_config

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(s // self.patch_size for s in self.input_hw)

    @torch.inference_mode()
    def __call__(self, windows) -> torch.Tensor:
        windows = windows if isinstance(windows, torch.Tensor) else torch.from_numpy(windows)
        if windows.ndim != 5 or windows.shape[1] != self.window:
            raise ValueError(f"expected uint8 windows [B, {self.window}, H, W, 3], got {tuple(windows.shape)}")
        b, t = windows.shape[:2]
        x = resize(to_nchw_float(windows.reshape(b * t, *windows.shape[2:]), self.device), self.input_hw)
        x = (x.reshape(b, t, 3, *self.input_hw) - self._mean) / self._std  # [B, T, 3, H, W]
        (h, w), tubes = self.grid_hw, t // self.tubelet_size
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            hidden = self.model(pixel_values_videos=x, skip_predictor=True, output_hidden_states=True).hidden_states
            norm = self.model.encoder.layernorm
            feats = [norm(hidden[i]).reshape(b, tubes, h, w, -1).mean(1) for i in self.layers]  # tubes averaged
        return torch.cat(feats, dim=-1).float()  # [B, h, w, D]

    def describe(self) -> dict:
        d = {
            **feature_record(self, self.model, "final", IMAGENET_NORMALIZATION),
            "window": self.window,
            "tubelet_size": self.tubelet_size,
            "alignment": "scene frames f-window+1..f (first frame repeated at a scene start), tubes averaged",
        }
        if self.tiny_config is not None:
            d["config"] = self.tiny_config
        return d


def tiny_vjepa2_model():
    from transformers import VJEPA2Config, VJEPA2Model

    return seeded(lambda: VJEPA2Model(VJEPA2Config(**TINY_VJEPA2)), TINY_SEED)


def load_vjepa2(
    spec: str = VJEPA2_DEFAULT,
    input_hw=None,
    layers=None,
    device="cpu",
    *,
    window=DEFAULT_WINDOW,
    autocast_dtype=None,
    allow_download=False,
    revision=None,
    cache_dir=None,
) -> VideoBackbone:
    """V-JEPA 2's encoder: "tiny" (random), a hub id or a local folder."""
    where = {"allow_download": allow_download, "revision": revision, "cache_dir": cache_dir}
    tiny_config = {**TINY_VJEPA2, "seed": TINY_SEED}
    model, _, wid, rev, tiny = backbone_weights(
        spec, tiny_vjepa2_model, tiny_config, "VJEPA2Model", "V-JEPA 2 weights", **where
    )
    return VideoBackbone(
        model,
        input_hw=input_hw,
        layers=layers,
        window=window,
        device=device,
        autocast_dtype=autocast_dtype,
        weights_id=wid,
        revision=rev,
        tiny_config=tiny,
    )
