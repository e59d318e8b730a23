"""Compression specs: a lossless codec, optionally followed by one lossy step (never the default).

A spec is `CODEC[:LEVEL][+LOSSY]`. CODEC is a Zarr v3 codec: `none`, `blosc-lz4`, `blosc-zstd` (Blosc
with byte shuffle and 1 MiB blocks) or `zstd`; LEVEL its compression level (Blosc 1..9, zstd 1..22;
defaults in LEVELS: `blosc-zstd` is `blosc-zstd:5`). LOSSY is
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

CODECS = ("none", "blosc-lz4", "blosc-zstd", "zstd")
LEVELS = {"blosc-lz4": (5, 1, 9), "blosc-zstd": (5, 1, 9), "zstd": (3, 1, 22)}  # default, lowest, highest
_LOSSY = re.compile(r"trim(\d{1,2})|int8")
# side arrays of the int8 option: one float32 scale per (row, channel)
SCALES = {"frames/features": "frames/feature_scales", "clips/latents": "clips/latent_scales"}


@dataclass(frozen=True)
class Compression:
    codec: str  # lossless Zarr codec for every array
    lossy: str | None = None  # None, "trim", "int8"
    mantissa_bits: int | None = None  # trim only: bits kept (1..10)
    level: int | None = None  # the codec's level (None for `none`)

    @property
    def spec(self) -> str:
        default = LEVELS.get(self.codec, (None,))[0]
        codec = self.codec if self.level == default else f"{self.codec}:{self.level}"  # as parse_compression reads
        if self.lossy is None:
            return codec
        return f"{codec}+{f'trim{self.mantissa_bits}' if self.lossy == 'trim' else 'int8'}"

    def compressor(self):
        """The Zarr v3 codec that compresses every chunk (None: stored as plain bytes). Blosc's shuffle groups
        the bytes of float16 values: 1.15x vs zstd's 1.08x on PCA features, but only with a block of
        >= 1 MiB (the default block size loses the gain)."""
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.codec == "zstd":
            return ZstdCodec(level=self.level)
        if self.codec.startswith("blosc-"):
            cname = self.codec.removeprefix("blosc-")
            return BloscCodec(cname=cname, clevel=self.level, shuffle="shuffle", typesize=2, blocksize=1 << 20)
        return None

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
    """'none', 'blosc-zstd:3', 'zstd+trim7', 'blosc-lz4+int8', ... -> Compression; ValueError naming the choices."""
    codec_level, plus, lossy = str(spec).partition("+")
    codec, colon, level = codec_level.partition(":")
    if codec not in CODECS or (colon and codec == "none"):
        raise ValueError(
            f"unknown compression {spec!r}: choose a codec from {CODECS} (a level after a colon: "
            "blosc-zstd:3), optionally followed by +trimK (keep K of float16's 10 mantissa bits) or +int8"
        )
    default, lo, hi = LEVELS.get(codec, (None, None, None))
    if colon:
        if not (level.isdigit() and lo <= int(level) <= hi):
            raise ValueError(f"compression {spec!r}: {codec}'s level must be an integer in {lo}..{hi}")
        default = int(level)
    if not plus:
        return Compression(codec, level=default)
    m = _LOSSY.fullmatch(lossy)
    if not m:
        raise ValueError(f"unknown lossy step {lossy!r} in compression {spec!r}: use trimK (K in 1..10) or int8")
    if lossy == "int8":
        return Compression(codec, "int8", level=default)
    k = int(m.group(1))
    if not 1 <= k <= 10:
        raise ValueError(f"compression {spec!r}: trimK keeps K in 1..10 of float16's mantissa bits")
    return Compression(codec, "trim", k, level=default)


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
