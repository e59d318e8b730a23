"""WAN2.1 VAE: RGB clips -> normalized posterior-mean latents, and back.

Latent normalization follows diffusers' Wan pipelines (WanImageToVideoPipeline.prepare_latents
encodes with `latent_dist.mode()` and stores `(z - latents_mean) * (1 / latents_std)`;
WanPipeline decodes `z / (1 / latents_std) + latents_mean`), with latents_mean / latents_std
the per-channel lists in the VAE config. Pixels are scaled to [-1, 1] (x / 127.5 - 1) as
diffusers' VideoProcessor does. The VAE is causal: latent 0 = frame 0, latent t = frames 4t-3 .. 4t.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from ..frames import resize
from ..store.geometry import PAPER, TINY
from .dinov2 import to_nchw_float
from .hashing import HashedWeights, load_demo_model, load_pretrained, seeded

# tiny preset: same architecture (z_dim 16, 8x spatial, 4x temporal, default latents_mean/std) from a
# small random config; 96 x 160 input -> 12 x 20 latents, matches geometry.TINY
TINY_CONFIG = {"base_dim": 4, "num_res_blocks": 1}
# tiny Wan2.2 preset: Wan2.2-TI2V-5B's VAE architecture (48 latent channels, 2x2 pixel patchify + 8x
# = 16x spatial, 4x temporal, residual) at a small width; 96 x 160 -> 6 x 10 latents of 48 channels
TINY_WAN22_CONFIG = {
    "base_dim": 4,
    "decoder_base_dim": 8,
    "z_dim": 48,
    "num_res_blocks": 1,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
TINY_SEED = 0
# demo preset: the same architecture at a small width, TRAINED on the synthetic driving set by
# `python scripts/train_demo_vae.py` (weights + config with its own latents_mean/std in weights/), so that
# the demo's pictures show what the models predict; 96 x 160 -> 12 x 20 latents at geometry.TINY
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_wan_vae"
# the demo VAEs by spec: (weights stem, the command that trains them from a checkout's root, how long it takes);
# demo-predictive is the same training with the PV-VAE objective (predictive latents, issue #28); its flag
# values are a first choice, not tuned: keep this command the one its shipped JSON's training.args record
DEMO_VAES = {
    "demo": (DEMO_WEIGHTS, "scripts/train_demo_vae.py", "about 25 min on one CPU core"),
    "demo-predictive": (
        DEMO_WEIGHTS.with_name("demo_wan_vae_predictive"),
        "scripts/train_demo_vae.py --init pipeline/encoders/weights/demo_wan_vae.safetensors --steps 1500 "
        "--lr 5e-4 --warmup 50 --long-steps 300 --long-lr 2e-4 --predictive-drop 0.5 --motion-weight 0.5 "
        "--decoder-steps 150 --out pipeline/encoders/weights/demo_wan_vae_predictive",
        "about an hour on one CPU core",
    ),
}
# input sizes from the geometry presets (pipeline/store/geometry.py), so that the two never disagree
PRESETS = {
    "tiny": {"input_hw": TINY.vae_input_hw},
    "tiny-wan2.2": {"input_hw": TINY.vae_input_hw},
    "demo": {"input_hw": TINY.vae_input_hw},
    "demo-predictive": {"input_hw": TINY.vae_input_hw},
    "default": {"input_hw": PAPER.vae_input_hw},
}
_TINY = {"tiny": TINY_CONFIG, "tiny-wan2.2": TINY_WAN22_CONFIG}


class WanVAEEncoder(HashedWeights):
    """Frozen WAN VAE. `encoder(clips)` -> latents [B, z_dim, 1 + (T-1)/4, H/s, W/s] float32 on `device`:
    WAN2.1 z_dim 16, s = 8; Wan2.2 z_dim 48, s = 16 (its config's scale_factor_spatial, patch_size 2)."""

    def __init__(
        self,
        vae: AutoencoderKLWan,
        *,
        input_hw=(432, 768),
        device="cpu",
        autocast_dtype: torch.dtype | None = None,
        weights_id: str = "",
        revision: str | None = None,
        sizes: dict | None = None,
    ):
        """sizes: latent_channels, spatial, temporal, mean, std for a VAE whose config names them otherwise."""
        cfg = vae.config
        sizes = sizes or {
            "latent_channels": cfg.z_dim,
            "spatial": cfg.scale_factor_spatial,
            "temporal": cfg.scale_factor_temporal,
            "mean": cfg.latents_mean,
            "std": cfg.latents_std,
        }
        self.spatial_downsample = int(sizes["spatial"])
        self.temporal_downsample = int(sizes["temporal"])
        self.latent_channels = int(sizes["latent_channels"])
        self.name = "wan2.2_vae" if cfg.get("is_residual") else "wan2.1_vae"
        self.input_hw = tuple(int(s) for s in input_hw)
        if any(s % self.spatial_downsample for s in self.input_hw):
            raise ValueError(f"input_hw {self.input_hw} must be multiples of {self.spatial_downsample}")
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.latents_mean = [float(v) for v in sizes["mean"]]
        self.latents_std = [float(v) for v in sizes["std"]]
        shape = (1, self.latent_channels, 1, 1, 1)
        self._mean = torch.tensor(self.latents_mean, device=self.device).view(shape)
        self._std = torch.tensor(self.latents_std, device=self.device).view(shape)
        self.weights_id, self.revision = weights_id, revision

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def preprocess(self, clips) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> [B, 3, T, *input_hw] in [-1, 1]."""
        clips = clips if isinstance(clips, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(clips))
        if clips.ndim != 5:
            raise ValueError(f"expected uint8 RGB clips [B, T, H, W, 3], got {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        if (t - 1) % self.temporal_downsample:
            raise ValueError(f"clip length {t} must be 1 + {self.temporal_downsample}k (causal VAE)")
        x = resize(to_nchw_float(clips.reshape(b * t, *clips.shape[2:]), self.device), self.input_hw)
        x = x.reshape(b, t, 3, *self.input_hw).permute(0, 2, 1, 3, 4)
        return x * 2.0 - 1.0

    @torch.inference_mode()
    def __call__(self, clips) -> torch.Tensor:
        x = self.preprocess(clips)
        with self._autocast():
            z = self.vae.encode(x).latent_dist.mean  # posterior mean, never a sample
        return ((z.float() - self._mean) / self._std).contiguous()  # [B, 16, t, h, w]

    @torch.inference_mode()
    def decode(self, latents) -> torch.Tensor:
        """Normalized latents [B, 16, t, h, w] -> uint8 frames [B, 1 + 4(t-1), 8h, 8w, 3] on `device`."""
        z = torch.as_tensor(latents).to(self.device, torch.float32) * self._std + self._mean
        with self._autocast():
            x = self.vae.decode(z).sample  # [B, 3, T, H, W] in [-1, 1]
        return _to_uint8(x)

    def decode_after(self, context) -> FutureDecoder:
        """A decoder of futures that follow the normalized context latents [B, 16, m, h, w]: see FutureDecoder."""
        return FutureDecoder(self, context)

    def describe(self) -> dict:
        """What the store manifest records about this encoder."""
        d = {
            **self.weights_identity(self.vae),
            "input_size": list(self.input_hw),
            "resize": "bilinear-antialias-nocrop",
            "normalization": {"name": "minus_one_to_one"},
            "posterior": "mean",
            "latent_normalization": "(z - latents_mean) / latents_std",
            "latent_channels": self.latent_channels,
            "spatial_downsample": self.spatial_downsample,
            "temporal_downsample": self.temporal_downsample,
            "latents_mean": self.latents_mean,
            "latents_std": self.latents_std,
        }
        if self.weights_id in _TINY:
            d["config"] = {**_TINY[self.weights_id], "seed": TINY_SEED}
        if self.weights_id in DEMO_VAES:
            d["config"] = {
                k: self.vae.config[k]
                for k in ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
            }
        return d


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()


class FutureDecoder:
    """Pixels of clips that share one context, the context decoded once: `decoder(future)` is
    decode(cat(context, future)), normalized latents in, uint8 frames [B, 1 + 4(m + f - 1), H, W, 3] out.

    The WAN decoder is causal: it decodes one latent frame at a time, carrying a cache of each causal
    convolution's last input frames (AutoencoderKLWan._decode). A future's frames depend on the context only
    through that cache, so it is kept after the context and restored for every future: an evaluation decodes
    each prediction (every model, every sampling run) as its 3 future latent frames, not the clip's 7, and
    gets the same frames. A decode that cannot be resumed this way (tiled decoding, another diffusers VAE
    class) decodes the whole clip for each future instead."""

    def __init__(self, encoder: WanVAEEncoder, context):
        self.encoder, self.context = encoder, torch.as_tensor(context)
        vae = encoder.vae
        self.state = self.context_pixels = None
        if isinstance(vae, AutoencoderKLWan) and not vae.use_tiling:
            vae.clear_cache()
            try:
                with torch.inference_mode(), encoder._autocast():
                    self.context_pixels = _to_uint8(self._run(self.context, first=True))
                self.state = list(vae._feat_map)
            finally:
                vae.clear_cache()

    def _run(self, latents, first: bool = False) -> torch.Tensor:
        """Decode normalized latents frame by frame on the decoder's current cache: [B, 3, T, H, W] in [-1, 1]
        (unpatchified where the VAE patchifies, as AutoencoderKLWan._decode does)."""
        enc, vae = self.encoder, self.encoder.vae
        x = vae.post_quant_conv(latents.to(enc.device, torch.float32) * enc._std + enc._mean)  # per frame (1x1x1)
        out = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            one = x[:, :, i : i + 1]
            out.append(vae.decoder(one, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=first and i == 0))
        x = torch.cat(out, 2)
        return x if vae.config.patch_size is None else unpatchify(x, patch_size=vae.config.patch_size)

    @torch.inference_mode()
    def __call__(self, future) -> torch.Tensor:
        """Normalized future latents [B, 16, f, h, w] -> the whole clip's uint8 frames, context first."""
        future = torch.as_tensor(future)
        if self.state is None:
            return self.encoder.decode(torch.cat([self.context, future], 2))
        vae = self.encoder.vae
        vae._feat_map = [t.clone() if torch.is_tensor(t) else t for t in self.state]  # the decoder writes into it
        try:
            with self.encoder._autocast():
                return torch.cat([self.context_pixels, _to_uint8(self._run(future))], 1)
        finally:
            vae.clear_cache()


def tiny_vae_model(preset: str = "tiny") -> AutoencoderKLWan:
    """A tiny preset's VAE (WAN2.1 "tiny" or "tiny-wan2.2"): deterministic random weights (same seed -> same sha256)."""
    return seeded(lambda: AutoencoderKLWan(**_TINY[preset]), TINY_SEED)


def demo_vae_model(stem: Path = DEMO_WEIGHTS, spec: str = "demo") -> AutoencoderKLWan:
    """A demo preset's trained VAE from weights/demo_wan_vae{,_predictive}.{safetensors,json} (no pickle)."""
    _, train, took = DEMO_VAES[spec]
    return load_demo_model(
        stem,
        lambda config: AutoencoderKLWan(**config),
        what="VAE" if spec == "demo" else "predictive VAE",
        train=train,
        took=took,
    )


def load_wan_vae(
    spec: str,
    input_hw,
    device="cpu",
    *,
    subfolder: str | None = "vae",
    autocast_dtype: torch.dtype | None = None,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> WanVAEEncoder:
    """A WAN2.1 or Wan2.2 VAE: "tiny" / "tiny-wan2.2" (random weights), "demo" / "demo-predictive" (small,
    trained on the synthetic set: weights/), a hub id (looked up in the local HF cache unless allow_download)
    or a local folder.

    A folder may be a whole diffusers repo (with `vae/`) or the VAE folder itself; WAN2.1 and Wan2.2
    (e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers) both load as AutoencoderKLWan, told apart by their config.
    Callers go through registry.load_vae, which also reaches the other diffusers video VAEs (video_vae.py).
    """
    if spec in _TINY:
        vae, weights_id, rev = tiny_vae_model(spec), spec, None
    elif spec in DEMO_VAES:
        vae, weights_id, rev = demo_vae_model(DEMO_VAES[spec][0], spec), spec, None
    else:
        vae, _, weights_id, rev = load_pretrained(
            AutoencoderKLWan,
            spec,
            "the WAN VAE",
            flag="--vae",
            subfolder=subfolder,
            allow_download=allow_download,
            revision=revision,
            cache_dir=cache_dir,
        )
    return WanVAEEncoder(
        vae, input_hw=input_hw, device=device, autocast_dtype=autocast_dtype, weights_id=weights_id, revision=rev
    )
