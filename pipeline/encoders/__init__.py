"""Frozen encoders for the cache pipeline: DINOv2-Reg features and WAN2.1 VAE latents.

Only this package imports transformers / diffusers, and only when a loader is first used:
`import pipeline.encoders` stays light (Ray drivers, store code and the trainer never pay for it).
"""

from .hashing import EncoderWeightsError

__all__ = ["EncoderWeightsError", "load_dinov2", "load_vae"]


def __getattr__(name):  # lazy: load_dinov2 / load_vae import torch + transformers / diffusers
    if name == "load_dinov2":
        from .dinov2 import load_dinov2
        return load_dinov2
    if name == "load_vae":
        from .vae import load_vae
        return load_vae
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
