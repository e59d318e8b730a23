"""Clip geometry: how many frames a clip has, which are context, and the sizes every array takes.

Paper defaults (docs/design.md, "Clip geometry"): K = 25 frames, the first 13 context; the WAN2.1 VAE maps
432x768 RGB to 16 x 7 x 54 x 96 latents (8x spatial, 4x temporal, causal); DINOv2 sees frames
0, 4, ..., 24 (one per latent frame) at 448x784, a 32x56 patch grid, 3072-d, PCA'd to 1152.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from pipeline.config import ConfigError, from_dict

# upper bounds on every field (far above any real video model), and on the values in one stored row
_LIMITS = {
    "clip_frames": 4097,
    "context_frames": 4096,
    "temporal_downsample": 64,
    "spatial_downsample": 1024,
    "vae_input_hw": 16384,
    "latent_channels": 4096,
    "dino_input_hw": 16384,
    "patch_size": 1024,
    "feature_dim": 65536,
    "num_pca_channels": 65536,
}
_MAX_ROW_ELEMENTS = 1 << 30


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class Geometry:
    clip_frames: int = 25
    context_frames: int = 13
    temporal_downsample: int = 4
    spatial_downsample: int = 8
    vae_input_hw: tuple[int, int] = (432, 768)
    latent_channels: int = 16
    dino_input_hw: tuple[int, int] = (448, 784)
    patch_size: int = 14
    feature_dim: int = 3072
    num_pca_channels: int = 1152

    def __post_init__(self):
        for f in fields(self):  # bounds first: a manifest is read from elsewhere and sizes every allocation
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if len(values) != (2 if f.name.endswith("_hw") else 1) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 < x <= _LIMITS[f.name] for x in values
            ):
                raise ValueError(
                    f"geometry {f.name}={value!r} is out of bounds (positive integers up to {_LIMITS[f.name]})"
                )
        r = self.temporal_downsample
        if (self.clip_frames - 1) % r or (self.context_frames - 1) % r:
            raise ValueError(f"clip_frames-1 and context_frames-1 must be multiples of {r} (causal VAE)")
        if not 0 < self.context_frames < self.clip_frames:
            raise ValueError("need 0 < context_frames < clip_frames")
        if any(s % self.patch_size for s in self.dino_input_hw):
            raise ValueError(f"dino_input_hw {self.dino_input_hw} must be multiples of patch {self.patch_size}")
        if any(s % (2 * self.spatial_downsample) for s in self.vae_input_hw):
            raise ValueError(f"vae_input_hw {self.vae_input_hw} must be multiples of {2 * self.spatial_downsample}")
        if self.num_pca_channels > self.feature_dim:
            raise ValueError("num_pca_channels cannot exceed feature_dim")
        row = max(_prod(self.features_shape[1:]), _prod(self.latents_shape))
        if row > _MAX_ROW_ELEMENTS:
            raise ValueError(f"geometry makes rows of {row:,} values, more than {_MAX_ROW_ELEMENTS:,}")

    @property
    def latent_frames(self) -> int:  # 7: latent 0 = frame 0, latent t = frames 4t-3 .. 4t
        return 1 + (self.clip_frames - 1) // self.temporal_downsample

    @property
    def context_latents(self) -> int:  # 4: latents 0-3 hold frames 0-12
        return 1 + (self.context_frames - 1) // self.temporal_downsample

    @property
    def future_latents(self) -> int:  # 3: latents 4-6 hold frames 13-24
        return self.latent_frames - self.context_latents

    @property
    def latent_hw(self) -> tuple[int, int]:  # (54, 96)
        return tuple(s // self.spatial_downsample for s in self.vae_input_hw)

    @property
    def feature_hw(self) -> tuple[int, int]:  # (32, 56)
        return tuple(s // self.patch_size for s in self.dino_input_hw)

    @property
    def feature_frame_offsets(self) -> tuple[int, ...]:  # (0, 4, ..., 24): one DINOv2 frame per latent
        return tuple(range(0, self.clip_frames, self.temporal_downsample))

    @property
    def latents_shape(self) -> tuple[int, int, int, int]:  # [16, 7, 54, 96]
        return (self.latent_channels, self.latent_frames, *self.latent_hw)

    @property
    def features_shape(self) -> tuple[int, int, int, int]:  # [7, 32, 56, 1152]
        return (self.latent_frames, *self.feature_hw, self.num_pca_channels)

    def for_encoders(
        self,
        *,
        patch_size: int,
        feature_dim: int,
        latent_channels: int,
        spatial_downsample: int,
        temporal_downsample: int,
    ) -> Geometry:
        """This geometry with every size the frozen encoders fix taken from them (their configs): the
        feature encoder's patch size and feature dim, the VAE's latent channels and compression. The
        clip length, context, input sizes and PCA channels stay the user's; a VAE or backbone they do
        not fit (e.g. 25 frames under 8x temporal compression) is refused with the reason."""
        fixed = {
            "patch_size": patch_size,
            "feature_dim": feature_dim,
            "latent_channels": latent_channels,
            "spatial_downsample": spatial_downsample,
            "temporal_downsample": temporal_downsample,
        }
        fixed = {k: int(v) for k, v in fixed.items()}
        try:
            return replace(self, **fixed)
        except ValueError as e:
            raise ValueError(f"the encoders' {fixed} do not fit the clip geometry: {e}") from e

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return from_dict(cls, d, "geometry")


PAPER = Geometry()
# CPU demo and tests: same clip structure (25 frames, 13 context, 7 latents), small pictures.
TINY = Geometry(vae_input_hw=(96, 160), dino_input_hw=(112, 196), feature_dim=128, num_pca_channels=64)
GEOMETRIES = {"paper": PAPER, "tiny": TINY}


def resolve_geometry(spec) -> Geometry:
    """A named geometry (tiny, paper), or the fields that differ from the paper's as a dict or JSON text."""
    if isinstance(spec, str) and spec in GEOMETRIES:
        return GEOMETRIES[spec]
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"geometry must be {' or '.join(GEOMETRIES)} or a JSON object, got {spec!r}") from e
    return from_dict(Geometry, {**PAPER.to_dict(), **spec} if isinstance(spec, dict) else spec, "geometry")
