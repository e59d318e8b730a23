"""The stages of the cache job's Ray Data plan (plan.py): decode+resize (CPU actors) -> encode (one fused
actor per GPU: the feature encoder + PCA, then the video VAE; encoders/registry.py; with --pseudo-depth,
Depth Anything on the feature frames too) -> store writer (CPU actors).
One row per work unit; stages hand each other flat numpy arrays, and every row carries, per stage,
which actor handled it and how long it was busy (the job's summary reports actors, clips, busy seconds).

Why one fused encoder actor per GPU rather than a DINOv2 pool and a VAE pool: at paper geometry
the VAE is ~97 % of the encoder work, so a DINOv2 actor holding a GPU of its own leaves it idle,
and fractional GPUs in that ratio would depend on a cost measured elsewhere; a fused actor keeps
every GPU busy whatever the ratio, and a unit's frames never travel between two GPU workers.
On CPU-only machines every stage takes a fraction of a CPU so that the read stage always gets one
(an actor pool that takes every CPU starves it and the job hangs).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from ..sources.base import Source
from ..store.basis import PCABasis
from ..store.format import StoreError
from ..store.geometry import Geometry
from ..units import UnitPlan
from .read import read_unit
from .resources import StageResources


def node_cpus() -> int:
    """CPUs of this node (as the OS grants them to this process), not the cluster's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def actor_name() -> str:
    """A stable name for the actor running this code (Ray's actor id), or the process id outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # noqa: BLE001 -- a name for the summary only
        pass
    return f"pid-{os.getpid()}"


def _autocast(device: str, name: str):
    from ..encoders.registry import autocast_for, cache_precision

    return autocast_for(cache_precision(name, device))  # the precision the manifest records


def _first(column):
    """The single row of a batch_size=1 batch (ragged tensor columns arrive as object arrays)."""
    return column[0]


class DecodeStage:
    """Ray task body (map_batches, batch_size=1): plan -> resized uint8 frames."""

    def __init__(
        self, source: Source, geometry: Geometry, variants: list[str], with_clips: bool = True, window: int = 1
    ):
        self.source, self.geometry, self.variants, self.with_clips = source, geometry, variants, with_clips
        self.window = window
        self.name = actor_name()

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = read_unit(
            UnitPlan.from_json(str(_first(batch["plan"]))),
            self.source,
            self.geometry,
            self.variants,
            self.with_clips,
            self.window,
        )
        out = {k: [v] if isinstance(v, str) else v[None] for k, v in out.items()}
        out["t_decode"] = np.array([time.perf_counter() - t0])
        out["a_decode"] = [self.name]
        return out


class Projector:
    """DINOv2 features -> standardized -> PCA components, in torch on the encoder's device."""

    def __init__(self, basis: PCABasis, device):
        import torch

        comps = torch.from_numpy(basis.components / basis.std[None, :])  # [C, D]
        self.weight = comps.T.contiguous().to(device)  # [D, C]
        self.bias = torch.from_numpy(basis.mean).to(device) @ self.weight  # [C]

    def __call__(self, features):  # [..., D] float32 -> [..., C] float32
        return features @ self.weight - self.bias


@dataclass(frozen=True)
class EncodeSpec:
    """What an encode actor loads and how it runs, built once per plan (plan.encode_spec) and handed to
    every actor of the pool. `vae` None: the PCA fitting pass (no VAE, no pseudo-depth)."""

    encoder: str  # the feature encoder's spec (encoders/registry.py)
    vae: str | None
    geometry: Geometry
    basis: PCABasis | None  # None: the PCA fitting pass
    device: str
    batch_frames: int
    batch_clips: int
    res: StageResources
    num_variants: int = 1
    allow_download: bool = False
    pseudo_depth: str | None = None  # a Depth Anything spec
    pseudo_depth_hw: tuple[int, int] | None = None


class EncodeStage:
    """Actor: a unit's feature-encoder features (PCA-projected to float16 rows for the store) and its clips'
    video VAE posterior means (normalized, float16). With no basis it is the PCA fitting pass:
    float64 moments of the features, and no VAE is loaded."""

    def __init__(self, spec: EncodeSpec):
        encoder_spec, vae_spec, geometry, basis = spec.encoder, spec.vae, spec.geometry, spec.basis
        device, batch_frames, batch_clips, res = spec.device, spec.batch_frames, spec.batch_clips, spec.res
        num_variants, allow_download = spec.num_variants, spec.allow_download
        pseudo_depth, pseudo_depth_hw = spec.pseudo_depth, spec.pseudo_depth_hw
        import torch

        from ..encoders import load_encoder, load_pseudo_depth, load_vae

        self.dino_threads = res.dino_threads or node_cpus()
        self.vae_threads = res.vae_threads or node_cpus()
        self.device = device
        if device == "cpu":
            torch.set_num_threads(self.dino_threads)
        self.encoder = load_encoder(
            encoder_spec,
            input_hw=geometry.dino_input_hw,
            device=device,
            autocast_dtype=_autocast(device, "dinov2"),
            allow_download=allow_download,
        )
        self.vae = (
            None
            if vae_spec is None
            else load_vae(
                vae_spec,
                input_hw=geometry.vae_input_hw,
                device=device,
                autocast_dtype=_autocast(device, "vae"),
                allow_download=allow_download,
            )
        )
        # the pseudo-depth target (optional): Depth Anything on the frames the feature encoder sees
        self.depth = (
            None
            if pseudo_depth is None or basis is None
            else load_pseudo_depth(
                pseudo_depth,
                geometry.dino_input_hw,
                pseudo_depth_hw,
                device,
                autocast_dtype=_autocast(device, "pseudo_depth"),
                allow_download=allow_download,
            )
        )
        self.projector = Projector(basis, device) if basis is not None else None
        self.geometry, self.batch_frames, self.batch_clips = geometry, batch_frames, batch_clips
        self.num_variants = num_variants
        self.name = actor_name()
        self.ready_at = time.time()  # models loaded: the job's steady state starts once every actor is

    def _threads(self, n: int) -> None:
        if self.device == "cpu":
            import torch

            torch.set_num_threads(n)

    def features(self, frames: np.ndarray):
        import torch

        for start in range(0, len(frames), self.batch_frames):
            yield self.encoder(frames[start : start + self.batch_frames]).to(torch.float32)

    def moments(self, frames: np.ndarray) -> dict:
        """The PCA fitting pass: exact, mergeable float64 moments of a unit's features."""
        import torch

        from ..pca import PCAAccumulator

        acc = PCAAccumulator(self.encoder.feature_dim)
        for f in self.features(frames):
            # the D x D scatter on the encoder's device (a 3072-d product is slow on a CPU)
            x = f.reshape(-1, acc.dim).to(torch.float64)
            mean = x.mean(0)
            acc.merge(
                PCAAccumulator.from_moments(x.shape[0], mean.cpu().numpy(), ((x - mean).T @ (x - mean)).cpu().numpy())
            )
        return {"count": np.array([acc.count]), "mean": acc.mean[None], "m2": acc.m2[None]}

    def projected(self, frames: np.ndarray) -> np.ndarray:
        import torch

        h, w = self.encoder.grid_hw
        parts = [self.projector(f).to(torch.float16).cpu().numpy() for f in self.features(frames)]
        c = self.projector.weight.shape[1]
        return np.concatenate(parts) if parts else np.zeros((0, h, w, c), np.float16)

    def pseudo_depth(self, frames: np.ndarray) -> np.ndarray:
        """[N, h, w] float16 relative disparity of the feature frames (a video encoder's: each window's last)."""
        import torch

        frames = frames[:, -1] if frames.ndim == 5 else frames
        parts = [
            self.depth(frames[s : s + self.batch_frames]).to(torch.float16).numpy()
            for s in range(0, len(frames), self.batch_frames)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, *self.depth.out_hw), np.float16)

    def latents(self, frames: np.ndarray, clips: list) -> np.ndarray:
        import torch

        n = len(frames) // self.num_variants  # frames are variant-major
        stacks = [frames[v * n + np.asarray(pos)] for v in range(self.num_variants) for _, pos in clips]
        out = []
        for start in range(0, len(stacks), self.batch_clips):
            z = self.vae(np.stack(stacks[start : start + self.batch_clips]))
            out.append(z.to(torch.float16).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *self.geometry.latents_shape), np.float16)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = {k: v for k, v in batch.items() if k not in ("dino_frames", "vae_frames")}
        frames = _first(batch["dino_frames"])
        self._threads(self.dino_threads)
        if self.projector is None:
            out.update(self.moments(frames))
            out["t_dino"] = np.array([time.perf_counter() - t0])
        else:
            out["features"] = self.projected(frames)[None]
            if self.depth is not None:
                out["pseudo_depth"] = self.pseudo_depth(frames)[None]
            t1 = time.perf_counter()
            out["t_dino"] = np.array([t1 - t0])
            self._threads(self.vae_threads)
            clips = json.loads(str(_first(batch["clips"])))
            out["latents"] = self.latents(_first(batch["vae_frames"]), clips)[None]
            out["t_vae"] = np.array([time.perf_counter() - t1])
        out["t_encode"] = np.array([time.perf_counter() - t0])
        out["a_encode"] = [self.name]
        out["ready_encode"] = np.array([self.ready_at])
        return out


class WriteStage:
    """Ray task body: write a unit's rows, then its completion marker (atomically, last)."""

    def __init__(self, location: str, storage_options: dict | None = None):
        from ..store.writer import StoreWriter

        self.writer = StoreWriter(location, storage_options)  # opened once per actor, not per unit
        self.name = actor_name()

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        writer = self.writer
        v = len(writer.variants)
        plan = UnitPlan.from_json(str(_first(batch["plan"])))
        own_rows = json.loads(str(_first(batch["own_rows"])))
        clips = [c for c, _ in json.loads(str(_first(batch["clips"])))]
        features, latents = _first(batch["features"]), _first(batch["latents"])
        depth = _first(batch["pseudo_depth"]) if "pseudo_depth" in batch else None
        stored = "pseudo_depth" in writer.manifest
        if (depth is not None) != stored:  # a unit marker must mean that every row of the unit is there
            raise StoreError(
                f"{writer.location}: the store {'holds' if stored else 'has no'} pseudo-depth, the encoders "
                f"{'computed none' if stored else 'computed it'}: rerun with the store's own --pseudo-depth"
            )
        digests, frame_rows, clip_rows = {}, [], []
        for var in range(v):  # stage outputs are variant-major; store rows are clip-major
            for j, row in enumerate(own_rows):
                r = row * v + var
                digests[f"features/{r}"] = writer.write_features(r, features[var * len(own_rows) + j])
                if depth is not None:
                    digests[f"pseudo_depth/{r}"] = writer.write_pseudo_depth(r, depth[var * len(own_rows) + j])
                frame_rows.append(r)
            for j, clip in enumerate(clips):
                r = clip * v + var
                digests[f"latents/{r}"] = writer.write_latents(r, latents[var * len(clips) + j])
                clip_rows.append(r)
        failures = json.loads(str(_first(batch["failures"])))
        writer.mark_unit_done(
            plan.unit_id, clip_rows=clip_rows, frame_rows=frame_rows, failures=failures, digests=digests
        )
        timings = {k: np.asarray(v, np.float64) for k, v in batch.items() if k.startswith(("t_", "ready_"))}
        actors = {k: list(v) for k, v in batch.items() if k.startswith("a_")}
        return {
            "unit": [plan.unit_id],
            "clips": [len(clips)],
            "failed": [len(failures)],
            **timings,
            **actors,
            "t_write": np.array([time.perf_counter() - t0]),
            "a_write": [self.name],
        }
