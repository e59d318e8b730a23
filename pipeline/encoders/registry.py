"""The frozen encoders by registry: one spec string chooses the feature encoder, one the VAE.

Feature encoder specs (`--encoder`):
    "tiny", a hub id or a folder     DINOv2-Reg (the paper's), as before
    "dinov2:SPEC"                    the same, explicitly
    "siglip2:SPEC"                   SigLIP-2's vision tower ("siglip2:tiny" is a tiny random config)
    "hf:SPEC"                        any transformers ViT-like vision backbone (hub id or local folder)
    "vjepa2:SPEC"                    V-JEPA 2's video encoder: each feature frame from the window of scene
                                     frames ending at it (video.py documents the alignment)
    '{"kind": "hf", "weights": SPEC, "layers": [4, 8, 12]}'   JSON: any of them with the blocks to take
    (and for vjepa2 the "window" of frames, default 4)
VAE specs (`--vae`): "tiny", "tiny-wan2.2", "demo", "demo-predictive" (the demo VAE trained with the PV-VAE
objective), a hub id or a folder of a WAN2.1 or Wan2.2 VAE;
"diffusers:SPEC" any other diffusers video VAE by its config's class ("tiny-hunyuan" for tests).

Every feature encoder has the same interface (`__call__(frames) -> [B, h, w, feature_dim]`,
`patch_size`, `feature_dim`, `describe()`), so PCA, the store and its compatibility checks treat
them alike; `describe()["name"]` names the encoder in the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .hashing import EncoderWeightsError

# What each encoder computes in on a GPU in the cache job (float32 on a CPU), recorded in the store
# manifest as its encoder's "precision" and used again at inference (inference/encoders.py).
# scripts/gpu_check.py measures bf16 against float32 for DINOv2-Reg and the WAN VAE.
GPU_PRECISION = {"dinov2": "bf16", "vae": "bf16", "pseudo_depth": "bf16"}


def cache_precision(name: str, device: str) -> str:
    """ "bf16" or "fp32": the precision the cache job runs encoder `name` in on `device`."""
    return GPU_PRECISION[name] if str(device).startswith("cuda") else "fp32"


def autocast_for(precision: str | None):
    """The autocast dtype of a recorded precision: bf16, or None (float32; also for stores that record none)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else None


FEATURE_KINDS = ("dinov2", "siglip2", "hf", "vjepa2")


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # one of FEATURE_KINDS
    weights: str  # "tiny", a hub id or a local folder
    layers: tuple[int, ...] | None = None  # 1-based blocks; None: the kind's default
    window: int | None = None  # video backbones: frames per feature frame; None: the default (4)


def parse_encoder_spec(spec: str) -> EncoderSpec:
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            d = json.loads(spec)
            kind, weights, layers = d.pop("kind", "dinov2"), d.pop("weights"), d.pop("layers", None)
            window = d.pop("window", None)
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise EncoderWeightsError(
                f"encoder spec {spec!r}: a JSON spec is an object with 'weights' (and optional 'kind', 'layers'): {e}"
            ) from e
        if d:
            raise EncoderWeightsError(f"encoder spec {spec!r}: unknown keys {sorted(d)}")
        if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
            raise EncoderWeightsError(f"encoder spec {spec!r}: 'layers' must be a list of block numbers")
        layers = tuple(layers) if layers else None
        if window is not None and (kind != "vjepa2" or not isinstance(window, int)):
            raise EncoderWeightsError(f"encoder spec {spec!r}: 'window' is an integer, for kind vjepa2 only")
    else:
        head, sep, rest = spec.partition(":")
        kind, weights, layers = (head, rest, None) if sep and head in FEATURE_KINDS else ("dinov2", spec, None)
        window = None
    if kind not in FEATURE_KINDS:
        raise EncoderWeightsError(f"encoder spec {spec!r}: kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
    if not isinstance(weights, str) or not weights:
        raise EncoderWeightsError(f"encoder spec {spec!r} names no weights")
    return EncoderSpec(kind, weights, layers, window)


def load_encoder(
    spec: str, input_hw=None, device="cpu", *, autocast_dtype=None, allow_download=False, revision=None, cache_dir=None
):
    """The feature encoder a spec names (see the module docstring), frozen, on `device`."""
    s = parse_encoder_spec(spec)
    kw = {
        "input_hw": input_hw,
        "layers": s.layers,
        "device": device,
        "autocast_dtype": autocast_dtype,
        "allow_download": allow_download,
        "revision": revision,
        "cache_dir": cache_dir,
    }
    if s.kind == "dinov2":
        from .dinov2 import load_dinov2

        return load_dinov2(s.weights, **kw)
    if s.kind == "siglip2":
        from .backbones import load_siglip2

        return load_siglip2(s.weights, **kw)
    if s.kind == "vjepa2":
        from .video import DEFAULT_WINDOW, load_vjepa2

        return load_vjepa2(s.weights, window=s.window or DEFAULT_WINDOW, **kw)
    from .backbones import load_hf_backbone

    return load_hf_backbone(s.weights, **kw)


# the paper's VAE, what `--vae` defaults to
DEFAULT_VAE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def load_vae(
    spec: str = DEFAULT_VAE,
    input_hw=None,
    device="cpu",
    *,
    subfolder: str | None = "vae",
    autocast_dtype=None,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
):
    """The frozen VAE a spec names (a vae.WanVAEEncoder or a video_vae.DiffusersVideoVAE, same interface).

    spec: "tiny" / "tiny-wan2.2" (random weights), "demo" / "demo-predictive" (small, trained on the synthetic
    set: weights/), a hub id (looked up in the local HF cache unless allow_download) or a local folder.

    "diffusers:SPEC" (or "tiny-hunyuan") loads any other diffusers video VAE (video_vae.py).
    A folder may be a whole diffusers repo (with `vae/`) or the VAE folder itself; WAN2.1 and Wan2.2
    (e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers) both load as AutoencoderKLWan, told apart by their config.
    input_hw defaults to the preset's: tiny and demo(-predictive) (96, 160), else (432, 768).
    """
    from .vae import PRESETS, load_wan_vae

    input_hw = input_hw or PRESETS[spec if spec in PRESETS else "default"]["input_hw"]
    kw = {
        "subfolder": subfolder,
        "autocast_dtype": autocast_dtype,
        "allow_download": allow_download,
        "revision": revision,
        "cache_dir": cache_dir,
    }
    if spec == "tiny-hunyuan" or spec.startswith("diffusers:"):  # any other diffusers video VAE
        from .video_vae import load_diffusers_vae

        return load_diffusers_vae(spec.removeprefix("diffusers:"), input_hw, device, **kw)
    return load_wan_vae(spec, input_hw, device, **kw)


def derive_geometry(geometry, encoder, vae):
    """`geometry` with the sizes the loaded encoders fix (Geometry.for_encoders); a misfit is an EncoderWeightsError."""
    try:
        return geometry.for_encoders(
            patch_size=encoder.patch_size,
            feature_dim=encoder.feature_dim,
            latent_channels=vae.latent_channels,
            spatial_downsample=vae.spatial_downsample,
            temporal_downsample=vae.temporal_downsample,
        )
    except ValueError as e:
        raise EncoderWeightsError(f"{encoder.weights_id} + {vae.weights_id}: {e}") from e
