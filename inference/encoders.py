"""The frozen encoders at inference time, loaded as the store records them: its weights id unless another
spec is given, the sha256 it recorded checked (a mismatch is refused unless allowed), and the precision
the cache job encoded in (bf16 autocast or float32)."""

from __future__ import annotations

import logging

from pipeline.encoders import EncoderWeightsError

from . import InferenceError

log = logging.getLogger("re2pix.inference")


def load_vae_for(spec: str | None, manifest: dict | None, geometry, device, allow_download=False, allow_mismatch=False):
    from pipeline.encoders import load_vae

    return _checked(
        load_vae(
            spec or _weights_id(manifest, "vae"),
            input_hw=geometry.vae_input_hw,
            device=device,
            autocast_dtype=_recorded_precision(manifest, "vae"),
            allow_download=allow_download,
        ),
        manifest,
        "vae",
        allow_mismatch,
    )


def load_dinov2_for(
    spec: str | None, manifest: dict | None, geometry, device, allow_download=False, allow_mismatch=False
):
    from pipeline.encoders import load_dinov2

    enc = load_dinov2(
        spec or _weights_id(manifest, "dinov2"),
        input_hw=geometry.dino_input_hw,
        device=device,
        autocast_dtype=_recorded_precision(manifest, "dinov2"),
        allow_download=allow_download,
    )
    if enc.feature_dim != geometry.feature_dim:
        raise InferenceError(f"DINOv2 {spec} gives {enc.feature_dim}-d features; the data has {geometry.feature_dim}")
    return _checked(enc, manifest, "dinov2", allow_mismatch)


def _recorded_precision(manifest: dict | None, name: str):
    """The autocast dtype the cache job encoded with (its manifest's "precision"; float32 when it records none):
    features and latents computed at inference then match the stored ones."""
    from pipeline.encoders.registry import autocast_for

    return autocast_for(((manifest or {}).get("encoders", {}).get(name) or {}).get("precision"))


def _weights_id(manifest: dict | None, name: str) -> str:
    wid = ((manifest or {}).get("encoders", {}).get(name) or {}).get("weights_id")
    if not wid:
        raise InferenceError(f"no --{name} given and no store records which {name} made it")
    return wid


def _checked(encoder, manifest: dict | None, name: str, allow_mismatch: bool):
    want = ((manifest or {}).get("encoders", {}).get(name) or {}).get("sha256")
    if want and encoder.describe()["sha256"] != want:
        msg = (
            f"the {name} weights loaded ({encoder.weights_id}, sha256 {encoder.describe()['sha256'][:12]}) are "
            f"not the ones the store was made with (sha256 {want[:12]})"
        )
        if not allow_mismatch:
            raise EncoderWeightsError(msg + ": pass the same weights, or --allow-weights-mismatch")
        log.warning("%s", msg)
    return encoder
