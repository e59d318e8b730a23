"""Compression specs: a lossless codec, optionally followed by one lossy step (never the default).

A spec is `CODEC[+LOSSY]`: CODEC is one of `blosc-zstd`, `zstd`, `none` (Zarr v3 codecs); LOSSY is
  - `trimK`  float16 values with only the top K of their 10 mantissa bits kept (round to nearest);
             stored as float16, so any reader reads them; K = 10 is lossless, K = 7 is ~0.4 % error;
  - `int8`   per-channel int8: each stored row (a feature frame, a clip's latents) keeps one float32
             scale per channel (max |x| / 127) in a side array; the reader multiplies it back.
The manifest records the spec under `compression` and its lossy step under `lossy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CODECS = ("blosc-zstd", "zstd", "none")
_LOSSY = re.compile(r"trim(\d{1,2})|int8")
# side arrays of the int8 option: one float32 scale per (row, channel)
SCALES = {"frames/features": "frames/feature_scales", "clips/latents": "clips/latent_scales"}


@dataclass(frozen=True)
class Compression:
    codec: str  # lossless Zarr codec for every array
    lossy: str | None = None  # None, "trim", "int8"
    mantissa_bits: int | None = None  # trim only: bits kept (1..10)

    @property
    def spec(self) -> str:
        if self.lossy is None:
            return self.codec
        return f"{self.codec}+{f'trim{self.mantissa_bits}' if self.lossy == 'trim' else 'int8'}"

    def manifest_entry(self) -> dict | None:
        """What the manifest says about the lossy step (None when lossless)."""
        if self.lossy == "trim":
            return {"kind": "trim", "mantissa_bits": self.mantissa_bits, "applies_to": sorted(SCALES)}
        if self.lossy == "int8":
            return {"kind": "int8", "scales": dict(SCALES), "applies_to": sorted(SCALES)}
        return None

    @property
    def dtype(self) -> str:
        return "int8" if self.lossy == "int8" else "float16"


def parse_compression(spec: str) -> Compression:
    """'blosc-zstd', 'zstd+trim7', 'blosc-zstd+int8', ... -> Compression; ValueError naming the choices."""
    codec, plus, lossy = str(spec).partition("+")
    if codec not in CODECS:
        raise ValueError(
            f"unknown compression {spec!r}: choose a codec from {CODECS}, optionally "
            "followed by +trimK (keep K of float16's 10 mantissa bits) or +int8"
        )
    if not plus:
        return Compression(codec)
    m = _LOSSY.fullmatch(lossy)
    if not m:
        raise ValueError(f"unknown lossy step {lossy!r} in compression {spec!r}: use trimK (K in 1..10) or int8")
    if lossy == "int8":
        return Compression(codec, "int8")
    k = int(m.group(1))
    if not 1 <= k <= 10:
        raise ValueError(f"compression {spec!r}: trimK keeps K in 1..10 of float16's mantissa bits")
    return Compression(codec, "trim", k)


def trim_mantissa(a: np.ndarray, keep_bits: int) -> np.ndarray:
    """float16 with the low 10-keep_bits mantissa bits rounded away (round half to even, as the hardware does)."""
    a = np.ascontiguousarray(a, np.float16)
    drop = 10 - int(keep_bits)
    if drop <= 0:
        return a
    u = a.view(np.uint16).astype(np.uint32)
    finite = np.isfinite(a)
    half, mask = 1 << (drop - 1), (1 << drop) - 1
    odd = (u >> drop) & 1
    rounded = ((u + half - 1 + odd) & ~np.uint32(mask)).astype(np.uint16)  # may carry into the exponent: fine
    out = np.where(finite, rounded, a.view(np.uint16)).view(np.float16)
    return np.where(np.isfinite(out) | ~finite, out, np.float16(np.copysign(65504, a)))  # never round to Inf


def quantize_int8(a: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """a (float) -> (int8 values, float32 scales [C]) with a ≈ q * scale along `channel_axis`."""
    x = np.asarray(a, np.float32)
    axes = tuple(i for i in range(x.ndim) if i != channel_axis % x.ndim)
    amax = np.abs(x).max(axis=axes)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    q = np.clip(np.rint(x / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values times their scales (shaped by the caller to broadcast on the channel axis) -> float16."""
    return (q.astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float16)
