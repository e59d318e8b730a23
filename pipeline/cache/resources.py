"""What each actor of the cache job asks Ray for: actor counts from the cluster, CPUs and GPUs per actor,
and the host memory each one declares, estimated before any actor starts (overrides from the config)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Re2pixError
from ..store.geometry import Geometry
from .config import CacheConfig


@dataclass
class StageResources:
    """What each actor asks Ray for. `gpus` > 0: encoder actors are GPU actors (also with device cpu)."""

    gpus: float = 0.0  # per encoder actor
    encoder_cpus: float = 0.5  # per encoder actor when no GPU is asked for
    gpu_encoder_cpus: float = 0.25  # per GPU encoder actor: its CPU work is feeding the GPU
    task_cpus: float = 0.25  # decode and write actors
    encoder_memory: int = 0  # bytes of host memory Ray reserves per encoder actor (0: none declared)
    decode_memory: int = 0  # per decode actor
    write_memory: int = 0  # per write actor
    dino_threads: int = 1  # intra-op torch threads for DINOv2 on CPU
    vae_threads: int = 0  # for the VAE on CPU; 0: every CPU of the node the actor runs on

    def actor_kwargs(self) -> dict:
        kw = (
            {"num_gpus": self.gpus, "num_cpus": self.gpu_encoder_cpus}
            if self.gpus > 0
            else {"num_cpus": self.encoder_cpus}
        )
        return {**kw, **_memory(self.encoder_memory)}

    def task_kwargs(self, stage: str) -> dict:
        return {"num_cpus": self.task_cpus, **_memory(getattr(self, f"{stage}_memory"))}


def _memory(nbytes: int) -> dict:
    return {"memory": int(nbytes)} if nbytes else {}


# Host memory per actor, estimated before any actor starts (Ray schedules by it; Ray Data warns when an
# actor's measured memory passes it). Activations on a CPU device, as multiples of the float32 input of
# one batch, measured here with one torch thread: WAN2.1 VAE (127M) 93x at 144x256, the tiny and demo
# VAEs 20x and 40x; a ViT's attention at DINOv2-B's 448x784 grid is ~36x. On a GPU they live on the GPU.
VAE_ACTIVATIONS = 96
FEATURE_ACTIVATIONS = 40
HEADROOM = 1.25  # Ray Data's own margin: it warns below 1.25x the measured peak


def unit_bytes(geometry: Geometry, unit_clips: int, stride: int, variants: int, window: int = 1) -> tuple[int, int]:
    """Upper bounds of one work unit's bytes between stages: (decoded frames, encoded rows)."""
    frames = (unit_clips - 1) * stride + geometry.clip_frames  # distinct frames of its clips, at most
    own = unit_clips * geometry.latent_frames  # feature frames it owns, at most
    (vh, vw), (dh, dw), (fh, fw) = geometry.vae_input_hw, geometry.dino_input_hw, geometry.feature_hw
    decoded = variants * (frames * vh * vw * 3 + own * window * dh * dw * 3)
    latents = int(np.prod(geometry.latents_shape))
    encoded = variants * 2 * (own * fh * fw * geometry.num_pca_channels + unit_clips * latents)
    return decoded, encoded


def actor_memory(
    footprint: dict, geometry: Geometry, unit: tuple[int, int], device: str, batch_frames: int, batch_clips: int
) -> dict[str, int]:
    """Bytes to declare per actor, by stage. `footprint` is measured where the encoders were loaded for
    their weights' hashes (basis.describe_encoders): "worker", a worker process with torch
    imported; "encoders", the same with both encoders loaded. `unit` is unit_bytes()."""
    decoded, encoded = unit
    activations = 0
    if not device.startswith("cuda"):
        (vh, vw), (dh, dw) = geometry.vae_input_hw, geometry.dino_input_hw
        activations = max(
            VAE_ACTIVATIONS * batch_clips * geometry.clip_frames * vh * vw * 3 * 4,
            FEATURE_ACTIVATIONS * batch_frames * dh * dw * 3 * 4,
        )
    worker, encoders = footprint["worker"], footprint["encoders"]
    return {  # a unit in flight, one arriving, and their float copies on the way in or out
        "encode": int(HEADROOM * (encoders + activations + 2 * decoded + 3 * encoded)),
        "decode": int(HEADROOM * (worker + 3 * decoded)),
        "write": int(HEADROOM * (worker + 3 * encoded)),
    }


def encoder_device(cfg: CacheConfig, cluster) -> str:
    return cfg.device if cfg.device != "auto" else ("cuda" if cluster.gpus else "cpu")


def plan_resources(cfg: CacheConfig, cluster, units: int, memory: dict[str, int] | None = None):
    """Actor counts and resources from the cluster (overrides from the config). `memory`: the estimated
    bytes per actor by stage (actor_memory); --encoder-memory-gb / --task-memory-gb win."""
    gpus = cluster.gpus
    device = encoder_device(cfg, cluster)
    memory = memory or {}
    task = int(cfg.task_memory_gb * 2**30)
    declared = {
        "encoder_memory": int(cfg.encoder_memory_gb * 2**30) or memory.get("encode", 0),
        "decode_memory": task or memory.get("decode", 0),
        "write_memory": task or memory.get("write", 0),
    }
    threads = {"dino_threads": cfg.dino_threads, "vae_threads": cfg.vae_threads}
    if gpus:
        per = cfg.gpus_per_encoder
        res = StageResources(gpus=per, **declared, **threads)
        n = cfg.encoder_actors or max(1, int(gpus / per + 1e-9))
    else:
        if device == "cuda":
            raise Re2pixError("--device cuda: the Ray cluster has no GPU")
        res = StageResources(**declared, **threads)
        n = cfg.encoder_actors or 1
    hi = max(n, cfg.max_encoder_actors)
    n, hi = min(n, units), min(hi, units)  # an actor without a unit would only load models
    decode_hi = min(units, cfg.decode_actors or max(1, int(cluster.cpus // 4)))
    return (
        res,
        device,
        {
            "encode": (max(1, n), max(1, hi)),
            "decode": (1, max(1, decode_hi)),
            "write": (1, max(1, min(units, int(cluster.cpus // 8) or 1))),
        },
    )
