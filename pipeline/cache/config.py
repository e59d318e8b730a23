"""The cache job's settings (`python -m jobs.cache --help` lists them): CacheConfig with its ranges and
choices, what of it a store records, and what is derived from it before anything runs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import Re2pixError
from ..store.format import DEFAULT_COMPRESSION

# where the demo keeps its store: --out's default (jobs/config.py DEMO_STORE, which the jobs' other paths use)
DEMO_STORE = "runs/demo/store.zarr"


@dataclass
class CacheConfig:
    dataset: str = field(
        default="synthetic", metadata={"help": "synthetic, videos, nuscenes, cityscapes, kitti, covla"}
    )
    data_root: str | None = field(default=None, metadata={"help": "dataset folder (not needed for synthetic)"})
    split: str = field(default="train", metadata={"help": "the dataset's split to cache (train, val, test)"})
    source_options: dict = field(default_factory=dict, metadata={"help": "JSON options for the dataset adapter"})
    out: str = field(default=DEMO_STORE, metadata={"help": "store path or fsspec URL (s3://...)"})
    storage_options: dict = field(
        default_factory=dict,
        metadata={
            "help": "JSON fsspec options for --out and --pca URLs, e.g. an endpoint; credentials are better left "
            "to the AWS_* variables (forwarded to every worker, never recorded)"
        },
    )
    geometry: str = field(default="tiny", metadata={"help": "tiny, paper, or JSON overrides of the paper's"})
    encoder: str = field(
        default="tiny",
        metadata={
            "aliases": ["--dinov2"],
            "help": "feature encoder: 'tiny' (RANDOM weights: plumbing tests only), 'demo' (small, trained on the "
            "synthetic set), a DINOv2-Reg hub id or folder, 'siglip2:SPEC', 'hf:SPEC', "
            "'vjepa2:SPEC' or JSON (pipeline/encoders/registry.py); --dinov2 is an alias",
        },
    )
    vae: str = field(
        default="tiny",
        metadata={
            "help": "'tiny', 'tiny-wan2.2' (RANDOM weights: plumbing tests only), 'demo' (small, trained on the "
            "synthetic set), a WAN2.1/Wan2.2 VAE hub id or folder, or 'diffusers:SPEC'"
        },
    )
    pseudo_depth: str | None = field(
        default=None,
        metadata={
            "help": "also store Depth Anything V2's relative disparity of each feature frame (frames/pseudo_depth): "
            "a hub id (e.g. depth-anything/Depth-Anything-V2-Small-hf) or a local folder; default off"
        },
    )
    pseudo_depth_scale: int = field(
        default=4, metadata={"help": "the stored pseudo-depth map's size, in multiples of the feature grid (1..16)"}
    )
    allow_download: bool = field(default=False, metadata={"help": "let transformers/diffusers download weights"})
    pca: str | None = field(default=None, metadata={"help": "reuse this PCA basis (path/URL) instead of fitting"})
    pca_frames: int = field(default=512, metadata={"help": "frames sampled to fit the PCA basis"})
    stride: int = field(default=4, metadata={"help": "frames between clip starts"})
    flip: bool = field(default=False, metadata={"help": "also cache each clip flipped left-right"})
    unit_clips: int = field(default=8, metadata={"help": "clips per work unit (the resume granularity)"})
    batch_frames: int = field(default=16, metadata={"help": "frames per feature-encoder call"})
    batch_clips: int = field(default=1, metadata={"help": "clips per VAE call"})
    max_clips: int | None = field(default=None, metadata={"help": "cache only the first N clips"})
    max_failures: int = field(default=-1, metadata={"help": "exit 2 when more clips fail (-1: any number)"})
    compression: str = field(
        default=DEFAULT_COMPRESSION,
        metadata={"help": "CODEC[:LEVEL][+trimK|+int8], CODEC in none, blosc-lz4, blosc-zstd, zstd"},
    )
    channel_chunk: int = field(default=128, metadata={"help": "PCA channels per stored chunk"})
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to use (default RAY_ADDRESS, else a running local one); 'local': a private one"},
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (cuda when the cluster has GPUs), cuda, or cpu: encoders on CPU even in GPU actors"},
    )
    encoder_actors: int = field(
        default=0, metadata={"help": "fused DINOv2+VAE actors (0: one per GPU of the cluster, or 1 without GPUs)"}
    )
    max_encoder_actors: int = field(
        default=0,
        metadata={"help": "grow the encoder pool up to this many as an autoscaler adds GPUs (0: --encoder-actors)"},
    )
    gpus_per_encoder: float = field(default=1.0, metadata={"help": "GPUs per encoder actor (0.5: two per GPU)"})
    encoder_memory_gb: float = field(
        default=0.0,
        metadata={
            "help": "host memory Ray reserves per encoder actor (0: estimated from the encoders as loaded, the "
            "geometry and the batch sizes)"
        },
    )
    task_memory_gb: float = field(
        default=0.0, metadata={"help": "host memory Ray reserves per decode and per write actor (0: estimated)"}
    )
    decode_actors: int = field(
        default=0,
        metadata={
            "help": "most CPU actors reading and resizing frames (0: a quarter of the cluster's CPUs, at least 1)"
        },
    )
    dino_threads: int = field(default=1, metadata={"help": "torch threads for DINOv2 on CPU (0: the node's CPUs)"})
    vae_threads: int = field(
        default=0, metadata={"help": "torch threads for the VAE on CPU; 0: every CPU of the node the actor runs on"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a store (or basis) at --out"})
    dry_run: bool = field(
        default=False, metadata={"help": "build the index, estimate size and encoder time, write nothing"}
    )
    progress: bool = field(default=True, metadata={"help": "a progress line while caching"})
    verbose: bool = field(default=False, metadata={"help": "show Ray's own log lines and notices"})

    def __post_init__(self) -> None:
        """Ranges and choices, checked when the config is built: before a source opens or Ray starts."""
        from pipeline.config import at_least, require
        from pipeline.store.lossy import parse_compression

        at_least(self, 1, "pca_frames", "stride", "unit_clips", "batch_frames", "batch_clips", "channel_chunk")
        at_least(self, 1, "max_clips")
        at_least(self, -1, "max_failures")
        at_least(self, 0, "encoder_actors", "max_encoder_actors", "decode_actors", "dino_threads", "vae_threads")
        at_least(self, 0, "encoder_memory_gb", "task_memory_gb")
        require(self.gpus_per_encoder > 0, "gpus_per_encoder", "> 0", self.gpus_per_encoder)
        parse_compression(self.compression)  # a ValueError naming the codecs and levels


# settings that do not change what is stored (where and how fast it runs): left out of the manifest
RUNTIME_ONLY = (
    "out",
    "storage_options",
    "overwrite",
    "dry_run",
    "progress",
    "verbose",
    "ray_address",
    "device",
    "encoder_actors",
    "max_encoder_actors",
    "gpus_per_encoder",
    "encoder_memory_gb",
    "task_memory_gb",
    "decode_actors",
    "dino_threads",
    "vae_threads",
    "max_failures",
    "allow_download",
)


def recorded_config(cfg: CacheConfig) -> dict:
    recorded = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_ONLY}
    if cfg.pseudo_depth is None:  # off: recorded as stores made before the option were (their reruns still match)
        del recorded["pseudo_depth"], recorded["pseudo_depth_scale"]
    return recorded


def pseudo_depth_size(cfg: CacheConfig, geometry) -> tuple[int, int] | None:
    """The stored pseudo-depth map's [h, w] (None: --pseudo-depth is off); a bad scale is one line."""
    from pipeline.store.format import pseudo_depth_hw

    if cfg.pseudo_depth is None:
        return None
    try:
        return pseudo_depth_hw(geometry, cfg.pseudo_depth_scale)
    except ValueError as e:
        raise Re2pixError(f"--pseudo-depth-scale: {e}") from e


def absolute_location(location: str) -> str:
    """A relative path is made absolute here, on the driver: each Ray actor has its own working folder."""
    from pipeline.store.location import is_url

    location = str(location)
    if location.startswith("file://"):
        return "file://" + os.path.abspath(location.removeprefix("file://"))
    return location if is_url(location) else os.path.abspath(os.path.expanduser(location))
