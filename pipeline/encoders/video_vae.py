"""Any `diffusers` video VAE (HunyuanVideo, CogVideoX, LTX-Video, ...) by its config's `_class_name`.

Its sizes come from the model: latent channels (`latent_channels` / `z_dim`), spatial and temporal
compression (`spatial_compression_ratio` / `temporal_compression_ratio`, as diffusers' pipelines read
them). The clip geometry derives from them, so a causal VAE whose latents are 1 + (T-1)/r frames fits
(Geometry refuses a clip length that is not 1 + r k). Latents are the posterior mean, normalized per
channel like the WAN VAEs': with the config's `latents_mean` / `latents_std` when it has them, else
from its scalar `shift_factor` and `scaling_factor` as (z - shift) * scaling (mean = shift,
std = 1 / scaling), so the store's latent_norm reads the same for every VAE.
"""

from __future__ import annotations

import json

from .hashing import EncoderWeightsError, from_pretrained, resolve_weights, seeded
from .vae import WanVAEEncoder

# tiny preset: HunyuanVideo's causal VAE (16 channels, 8x spatial, 4x temporal) at a small width
TINY_HUNYUAN = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
TINY_SEED = 0


class DiffusersVideoVAE(WanVAEEncoder):
    """A frozen diffusers video VAE with the WAN encoder's interface (encode, decode, describe)."""

    def __init__(
        self,
        vae,
        *,
        input_hw,
        device="cpu",
        autocast_dtype=None,
        weights_id="",
        revision=None,
        tiny_config: dict | None = None,
    ):
        cfg = vae.config
        channels = cfg.get("latent_channels", cfg.get("z_dim"))
        spatial = getattr(vae, "spatial_compression_ratio", None) or cfg.get("spatial_compression_ratio")
        temporal = getattr(vae, "temporal_compression_ratio", None) or cfg.get("temporal_compression_ratio")
        if not all(isinstance(v, int) and v > 0 for v in (channels, spatial, temporal)):
            raise EncoderWeightsError(
                f"{type(vae).__name__} ({weights_id}) is not a video VAE this pipeline can "
                f"size: latent channels {channels}, spatial {spatial}, temporal {temporal}"
            )
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            mean, std = list(cfg["latents_mean"]), list(cfg["latents_std"])
        else:
            mean = [float(cfg.get("shift_factor") or 0.0)] * channels
            std = [1.0 / float(cfg.get("scaling_factor") or 1.0)] * channels
        if len(mean) != channels or len(std) != channels:
            raise EncoderWeightsError(
                f"{type(vae).__name__} ({weights_id}): latents_mean / latents_std have "
                f"{len(mean)} / {len(std)} values for {channels} channels"
            )
        super().__init__(
            vae,
            input_hw=input_hw,
            device=device,
            autocast_dtype=autocast_dtype,
            weights_id=weights_id,
            revision=revision,
            sizes={"latent_channels": channels, "spatial": spatial, "temporal": temporal, "mean": mean, "std": std},
        )
        self.name = f"diffusers:{type(vae).__name__}"
        self.tiny_config = tiny_config

    def describe(self) -> dict:
        d = super().describe()
        d.pop("config", None)
        if self.tiny_config is not None:
            d["config"] = self.tiny_config
        return d


def tiny_hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return seeded(lambda: AutoencoderKLHunyuanVideo(**TINY_HUNYUAN), TINY_SEED)


def load_diffusers_vae(
    spec: str,
    input_hw,
    device="cpu",
    *,
    subfolder="vae",
    autocast_dtype=None,
    allow_download=False,
    revision=None,
    cache_dir=None,
) -> DiffusersVideoVAE:
    """spec: "tiny-hunyuan", or a hub id / folder of any diffusers video VAE (a whole repo with vae/ too)."""
    if spec == "tiny-hunyuan":
        return DiffusersVideoVAE(
            tiny_hunyuan_vae(),
            input_hw=input_hw,
            device=device,
            autocast_dtype=autocast_dtype,
            weights_id=spec,
            tiny_config={**TINY_HUNYUAN, "seed": TINY_SEED},
        )
    import diffusers

    where = {"allow_download": allow_download, "revision": revision, "cache_dir": cache_dir}
    local, wid, rev = resolve_weights(spec, flag="--vae", subfolder=subfolder, **where)
    try:
        name = json.loads((local / "config.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise EncoderWeightsError(f"{local}/config.json names no diffusers class (_class_name): {e}") from e
    cls = getattr(diffusers, str(name), None)
    if cls is None or not str(name).startswith("Autoencoder"):
        raise EncoderWeightsError(f"{local}: {name!r} is not a diffusers autoencoder class")
    vae = from_pretrained(cls, local, spec, name)
    return DiffusersVideoVAE(
        vae, input_hw=input_hw, device=device, autocast_dtype=autocast_dtype, weights_id=wid, revision=rev
    )
