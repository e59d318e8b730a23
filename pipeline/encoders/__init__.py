"""Frozen encoders for the cache pipeline: feature encoders (DINOv2-Reg, SigLIP-2, any transformers vision
backbone) and video VAEs (WAN2.1, Wan2.2), chosen by spec (registry.py); Depth Anything V2 for the optional
pseudo-depth target (depth_anything.py).

Only this package imports transformers / diffusers, and only when a loader is first used:
`import pipeline.encoders` stays light (Ray drivers, store code and the trainer never pay for it).
"""

from .hashing import EncoderWeightsError

__all__ = [
    "EncoderWeightsError",
    "derive_geometry",
    "load_dinov2",
    "load_encoder",
    "load_pseudo_depth",
    "load_vae",
    "parse_encoder_spec",
]

_LAZY = {
    "load_dinov2": "dinov2",
    "load_vae": "registry",
    "load_pseudo_depth": "depth_anything",
    "load_encoder": "registry",
    "derive_geometry": "registry",
    "parse_encoder_spec": "registry",
}


def __getattr__(name):  # lazy: the loaders import torch + transformers / diffusers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
