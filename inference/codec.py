"""Between pixels and the store's representation: latents through the WAN VAE with the store's latent
normalization, and PCA features through DINOv2, both exactly as the cache job stores them."""

from __future__ import annotations

import numpy as np
import torch


class LatentCodec:
    """The VAE with the store's latent normalization: latents in the store's space in and out."""

    def __init__(self, vae, latent_norm: dict | None):
        self.vae = vae
        shape = (1, -1, 1, 1, 1)
        own_mean, own_std = torch.tensor(vae.latents_mean), torch.tensor(vae.latents_std)
        mean = torch.tensor(latent_norm["mean"]) if latent_norm else own_mean
        std = torch.tensor(latent_norm["std"]) if latent_norm else own_std
        # store-normalized z -> raw -> the VAE's own normalization: z * a + b
        self.a = (std / own_std).view(shape)
        self.b = ((mean - own_mean) / own_std).view(shape)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[B, 16, T, h, w] store-normalized -> uint8 frames [B, 1 + 4 (T - 1), H, W, 3]."""
        z = latents.float().cpu() * self.a + self.b
        return self.vae.decode(z).cpu().numpy()

    def decode_after(self, context: torch.Tensor):
        """A function of future latents [B, 16, f, h, w] -> decode(cat(context, future)) for the context latents
        [B, 16, m, h, w] (store-normalized): the context is decoded once for all the futures given to it
        (pipeline.encoders.vae.FutureDecoder, which decodes the whole clip where its VAE cannot resume)."""
        decoder = self.vae.decode_after(context.float().cpu() * self.a + self.b)
        return lambda future: decoder(future.float().cpu() * self.a + self.b).cpu().numpy()

    def encode(self, clips: np.ndarray) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> store-normalized latents [B, 16, t, h, w] (through float16, as stored)."""
        z = self.vae(clips).float().cpu()
        return ((z - self.b) / self.a).half().float()


def encode_features(dino, basis, frames: np.ndarray, geometry) -> np.ndarray:
    """uint8 frames [N, H, W, 3] -> PCA features [N, h, w, C] float32 (resized and rounded through
    float16 exactly as the cache job stores them)."""
    from pipeline.frames import resize_frames

    raw = dino(resize_frames(frames, geometry.dino_input_hw)).float().cpu().numpy()
    return basis.project(raw).astype(np.float16).astype(np.float32)
