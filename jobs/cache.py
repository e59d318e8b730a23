"""Cache a dataset into a store: `python -m jobs.cache --preset tiny --dataset synthetic --out STORE`.

source -> clip index -> cheap checks -> (PCA basis: reuse --pca, or fit on a sample) -> Ray Data:
decode+resize -> encode (feature encoder -> PCA -> float16, video VAE; one fused actor per GPU) -> store.
--encoder chooses DINOv2-Reg, SigLIP-2, any transformers backbone or V-JEPA 2, --vae the WAN2.1 or Wan2.2
VAE (pipeline/encoders/registry.py); the clip geometry takes the sizes they fix from them. --pseudo-depth also
stores Depth Anything V2's relative disparity of every feature frame (frames/pseudo_depth), the depth head's
labels for jobs.train_dpt --depth-labels pseudo-depth.
A rerun of the same command resumes a killed job and exits 0 at once on a finished store; where the source
gained scenes since, it appends only their clips, under the store's own basis and settings (StoreWriter._grow).
The Ray cluster: --ray-address / RAY_ADDRESS, else a running local cluster, else a private one.

Exit status: 0 when the store is finished with at most --max-failures failed clips (-1: any number),
2 when more failed (the store is still finished and lists them), 1 on errors, 130 / 143 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field

from jobs.cli import random_weights_notice, run
from jobs.config import DEMO_STORE, parse_config
from pipeline.errors import ConfigError, Re2pixError, TooManyFailuresError
from pipeline.store.format import DEFAULT_COMPRESSION
from pipeline.store.geometry import resolve_geometry

RESUME_HINT = "rerun the same command to resume"


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


def get_source(cfg: CacheConfig):
    from pipeline.sources import SOURCES, get_source

    if cfg.data_root is None and cfg.dataset != "synthetic" and cfg.dataset in SOURCES:
        raise ConfigError(f"--dataset {cfg.dataset} reads a folder: give it with --data-root DIR (make: DATA_ROOT=DIR)")
    return get_source(cfg.dataset, cfg.data_root, cfg.split, **cfg.source_options)


def build_index(cfg: CacheConfig, geometry=None, source=None):
    from pipeline.clips import build_clip_index

    geometry = geometry or resolve_geometry(cfg.geometry)
    source = source or get_source(cfg)
    index = build_clip_index(source, geometry, stride=cfg.stride, progress=cfg.progress)
    if cfg.max_clips is not None and len(index.clips) > cfg.max_clips:
        keep = index.clips[: cfg.max_clips]
        used = sorted({r for c in keep for r in c.feature_rows})
        remap = {r: i for i, r in enumerate(used)}
        keep = [type(c)(c.clip_id, c.scene, c.start, c.frames, tuple(remap[r] for r in c.feature_rows)) for c in keep]
        index = dataclasses.replace(index, clips=keep, frames=[index.frames[r] for r in used])
    for f in index.failures:
        print(f"skipped {f['file']}: {f['reason']}", file=sys.stderr)
    for f in index.ignored:
        print(f"ignored {f['file']}: {f['reason']}", file=sys.stderr)
    for note in index.notes:
        print(f"warning: {note}", file=sys.stderr)
    return source, geometry, index


def listed_inputs(index) -> list[dict]:
    """The store's failures table: unreadable scenes (their clips failed) and ignored inputs (no clip id)."""
    return index.failures + [{"clip_id": "", **f} for f in index.ignored]


# ---- cheap checks, before any encoder runs ----------------------------------------------------------
def estimated_bytes(index, geometry, variants: int, depth_hw: tuple[int, int] | None = None) -> int:
    """Uncompressed size of a store's features and latents (compression rarely saves more than ~1.4x), and
    of its pseudo-depth maps when `depth_hw`."""
    import math

    h, w = geometry.feature_hw
    features = len(index.frames) * variants * h * w * geometry.num_pca_channels * 2
    latents = len(index.clips) * variants * math.prod(geometry.latents_shape) * 2
    depth = len(index.frames) * variants * math.prod(depth_hw) * 2 if depth_hw else 0
    return features + latents + depth


def finished_store(cfg: CacheConfig) -> dict | None:
    """The manifest of a finished store at --out, or of one being appended to (None: nothing there yet, or
    an unfinished new store of ours). A folder that holds anything else is refused here, before any encoder runs."""
    from pipeline.store.writer import existing_store

    attrs = existing_store(cfg.out, cfg.storage_options or None)
    return attrs if attrs and (attrs.get("complete") or attrs.get("appending")) else None


# options free to change when a finished store grows: which scenes and clips there are, where the data is,
# how the job runs, and the basis (a store grows under its own one: store_settings compares it)
GROWTH_FREE = ("data_root", "max_clips", "unit_clips", "batch_frames", "batch_clips", "pca", "pca_frames")


def same_settings(manifest: dict, cfg: CacheConfig) -> tuple[str, object, object] | None:
    """None if a finished store was made by this command, its source free to have gained scenes; else the first
    option that differs, with its value there and now."""
    recorded, now = dict(manifest.get("cache_config", {})), recorded_config(cfg)
    if "dinov2" in recorded and "encoder" not in recorded:  # stores made before --dinov2 became --encoder
        recorded["encoder"] = recorded.pop("dinov2")
    for view in (recorded, now):
        for key in GROWTH_FREE:
            view.pop(key, None)
        if isinstance(view.get("source_options"), dict):  # the synthetic source's scene count
            view["source_options"] = {k: v for k, v in view["source_options"].items() if k != "num_scenes"}
    key = next((k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)), None)
    return None if key is None else (key, recorded.get(key), now.get(key))


def grown_index(cfg: CacheConfig, index):
    """The clip index of the store at --out grown by the source's new clips, and the clips and frames it
    already holds (clips.grow_index)."""
    from pipeline.clips import grow_index
    from pipeline.store.writer import stored_index

    ids, rows, frames = stored_index(cfg.out, cfg.storage_options or None)
    try:
        return grow_index(ids, rows, frames, index), len(ids), len(frames)
    except ValueError as e:
        raise Re2pixError(f"{cfg.out}: {e}; pass --overwrite to re-encode the store") from None


def check_writable(cfg: CacheConfig, need_bytes: int) -> None:
    """--out can be written and, for a local path, its disk has room for the store."""
    from pipeline.store.location import filesystem, is_url, write_atomic

    if is_url(cfg.out) and not cfg.out.startswith("file://"):
        fs, root = filesystem(cfg.out, cfg.storage_options or None)
        probe = f"{root}/.re2pix-probe-{uuid.uuid4().hex}"
        try:
            write_atomic(fs, probe, b"")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 -- any client error means: cannot write there
            raise Re2pixError(f"{cfg.out}: cannot write there ({type(e).__name__}: {e})") from e
        return
    path = cfg.out.removeprefix("file://")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise Re2pixError(f"{cfg.out}: {existing} is a file, not a folder")
    try:  # a real probe (permission bits say nothing for root or on network file systems)
        probe = os.path.join(existing, f".re2pix-probe-{uuid.uuid4().hex}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise Re2pixError(f"{cfg.out}: cannot write in {existing} ({e.strerror or e})") from e
    if not os.path.exists(path):  # a new store: room for all of it (a resumed one already holds part)
        free = shutil.disk_usage(existing).free
        if free < need_bytes:
            need = _size(need_bytes)
            raise Re2pixError(f"{cfg.out}: the store needs up to {need}, {existing} has {_size(free)} free")


def _size(n: int) -> str:
    """Bytes in the unit that keeps a figure readable (0.00 GiB said nothing of 3 MiB against 200 KiB)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} bytes"


def check_visible_from_every_node(cfg: CacheConfig, cluster) -> None:
    """A local --out on a multi-node cluster must be a folder every node sees (a shared file system)."""
    from pipeline.store.location import is_url

    if cluster.nodes < 2 or (is_url(cfg.out) and not cfg.out.startswith("file://")):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = os.path.dirname(cfg.out.removeprefix("file://").rstrip("/"))
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".re2pix-visible-{uuid.uuid4().hex}")
    open(probe, "wb").close()
    try:
        seen = ray.remote(num_cpus=0.01)(os.path.exists)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        found = ray.get(
            [
                seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe)
                for n in nodes
            ]
        )
    finally:
        os.remove(probe)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok]
    if blind:
        raise Re2pixError(
            f"{cfg.out} is a local path that node(s) {', '.join(blind)} do not see; use a folder "
            "shared by every node or an object-storage URL (s3://...)"
        )


# ---- Ray ------------------------------------------------------------------------------------------
def encoder_device(cfg: CacheConfig, cluster) -> str:
    return cfg.device if cfg.device != "auto" else ("cuda" if cluster.gpus else "cpu")


def plan_resources(cfg: CacheConfig, cluster, units: int, memory: dict[str, int] | None = None):
    """Actor counts and resources from the cluster (overrides from the config). `memory`: the estimated
    bytes per actor by stage (pipeline.ray_cache.actor_memory); --encoder-memory-gb / --task-memory-gb win."""
    from pipeline.ray_cache import StageResources

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


def _pool(ray, sizes, in_flight: int | None = None):
    lo, hi = sizes
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=in_flight)


ENCODER_IN_FLIGHT = 2  # units per encoder actor: the next unit's frames wait at the actor, not at the driver
OBJECT_STORE_UNITS = 4  # the object-store budget, in units per unit in flight


def encoding_plan(
    ray,
    cfg: CacheConfig,
    cluster,
    units,
    source,
    geometry,
    basis,
    variants,
    with_clips: bool,
    window: int = 1,
    footprint: dict | None = None,
):
    """One row per unit -> decoded, resized frames -> encoder actors (features and latents, or PCA
    moments when `basis` is None). Returns (dataset, pool sizes, resources, device).
    `footprint` (describe_encoders) sizes each actor's declared memory; None: nothing declared."""
    from pipeline.ray_cache import DecodeStage, EncodeStage, actor_memory, unit_bytes

    if with_clips:
        unit = unit_bytes(geometry, cfg.unit_clips, cfg.stride, len(variants), window)
    else:  # a PCA sample unit: frames for the feature encoder only; out: float64 moments (D x D)
        frames = max(len(u.own) for u in units)
        dh, dw = geometry.dino_input_hw
        unit = (frames * window * dh * dw * 3, 8 * (geometry.feature_dim + 2) * geometry.feature_dim)
    device = encoder_device(cfg, cluster)
    memory = None
    if footprint:
        memory = actor_memory(footprint, geometry, unit, device, cfg.batch_frames, cfg.batch_clips)
        # an estimate above every node's memory would leave the actor unplaceable: the job would wait forever
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        memory = {k: min(v, int(largest)) if largest else v for k, v in memory.items()}
    res, device, pools = plan_resources(cfg, cluster, len(units), memory)
    ds = ray.data.from_items([{"plan": u.to_json()} for u in units], override_num_blocks=max(1, len(units)))
    # Decoding is cheaper than encoding: unbounded, it would run ahead through the whole dataset and hold
    # every decoded unit in the object store (memory growing with the clip count, spilling at scale). Ray
    # Data's object-store budget bounds it to a few times the units in flight at every actor (Ray Data
    # splits the budget between the stages: a tighter one left encoder actors without units), and never
    # above Ray Data's own default, half the cluster's object store.
    in_flight = pools["encode"][1] * ENCODER_IN_FLIGHT + pools["decode"][1] + pools["write"][1]
    budget = OBJECT_STORE_UNITS * in_flight * sum(unit)
    budget = min(budget, ray.cluster_resources().get("object_store_memory", budget) / 2)
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    ds.context.wait_for_min_actors_s = 900  # every encoder actor loads its models before units are dealt
    # Ray Data deals a unit to an actor on the node that holds its frames while that actor has room,
    # even when an actor elsewhere is idle: on a cluster, GPUs on the other nodes waited. A unit's frames
    # are cheap to move next to a GPU-second of encoding, so the least busy actor gets the next unit.
    # Ray 2.60 marks the option deprecated (it still works): its warning would be noise in every job's stderr.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*actor_locality_enabled", category=DeprecationWarning)
        ds.context.execution_options.actor_locality_enabled = False
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_args=(source, geometry, variants, with_clips, window),
        batch_size=1,
        compute=_pool(ray, pools["decode"]),
        **res.task_kwargs("decode"),
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_args=(
            cfg.encoder,
            cfg.vae if with_clips else None,
            geometry,
            basis,
            device,
            cfg.batch_frames,
            cfg.batch_clips,
            res,
            len(variants),
            cfg.allow_download,
            cfg.pseudo_depth if with_clips else None,
            pseudo_depth_size(cfg, geometry) if with_clips else None,
        ),
        batch_size=1,
        compute=_pool(ray, pools["encode"], in_flight=ENCODER_IN_FLIGHT),
        **res.actor_kwargs(),
    )
    return ds, pools, res, device


def fit_basis(cfg: CacheConfig, source, geometry, index, ray, cluster, window: int = 1, footprint: dict | None = None):
    """First pass: the feature encoder on an even sample of feature frames; float64 moments merged in unit order,
    so the basis (and its fingerprint) does not depend on which worker finished first."""
    from pipeline.pca import PCAAccumulator
    from pipeline.units import plan_frames

    units = plan_frames(index, cfg.pca_frames)
    ds, _, _, _ = encoding_plan(ray, cfg, cluster, units, source, geometry, None, ["orig"], False, window, footprint)
    ds.context.execution_options.preserve_order = True  # units arrive in order: nothing waits in memory
    order = {u.unit_id: i for i, u in enumerate(units)}
    acc, pending, next_unit = PCAAccumulator(geometry.feature_dim), {}, 0
    progress = Progress("pca sample", sum(len(u.own) for u in units), "frames", cfg.progress)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        unit = json.loads(str(batch["plan"][0]))["unit_id"]
        pending[order[unit]] = PCAAccumulator.from_moments(batch["count"][0], batch["mean"][0], batch["m2"][0])
        while next_unit in pending:
            acc.merge(pending.pop(next_unit))
            next_unit += 1
        progress.update(len(json.loads(str(batch["own_rows"][0]))))
    if acc.count < 2:
        raise Re2pixError(f"{cfg.dataset}: no frame of the PCA sample could be read; see the lines above")
    return acc.to_basis(geometry.num_pca_channels)


def describe_encoders(
    encoder: str, vae: str, geometry, allow_download: bool, pseudo_depth: str | None = None, depth_scale: int = 4
) -> tuple[dict, dict, object, dict]:
    """The encoders' manifest entries (weights hashed as loaded), the VAE's latent normalization, the
    geometry with the sizes the encoders fix (patch, feature dim, latent channels, compression), and the
    memory of this process (unique set size) with torch imported and with both encoders loaded: what a
    worker and an encoder actor hold before their first unit (pipeline.ray_cache.actor_memory).
    With `pseudo_depth` (a Depth Anything spec), the entries hold "pseudo_depth" too: {"scale", "model"}."""
    import psutil

    from pipeline.encoders import derive_geometry, load_encoder, load_pseudo_depth, load_vae
    from pipeline.store.format import pseudo_depth_hw

    def uss() -> int:
        return psutil.Process().memory_full_info().uss

    import torch  # noqa: F401 -- part of every worker's footprint

    worker = uss()
    enc = load_encoder(encoder, input_hw=geometry.dino_input_hw, device="cpu", allow_download=allow_download)
    v = load_vae(vae, input_hw=geometry.vae_input_hw, device="cpu", allow_download=allow_download)
    derived = derive_geometry(geometry, enc, v)
    # the manifest's "dinov2" entry is the feature encoder, whichever it is: its "name" says which
    described = {"dinov2": enc.describe(), "vae": v.describe()}
    if pseudo_depth is not None:
        hw = pseudo_depth_hw(derived, depth_scale)
        depth = load_pseudo_depth(pseudo_depth, derived.dino_input_hw, hw, "cpu", allow_download=allow_download)
        described["pseudo_depth"] = {"scale": depth_scale, "model": depth.describe()}
    footprint = {"worker": worker, "encoders": uss()}
    return described, {"mean": v.latents_mean, "std": v.latents_std}, derived, footprint


def encoder_descriptions(
    cfg: CacheConfig, geometry, ray=None, with_pseudo_depth: bool = False
) -> tuple[dict, dict, object, dict]:
    """Hash the weights once per job, in a Ray worker when there is a cluster: the driver never holds
    a model (at paper size two models and a minute of hashing). The worker ends with the task
    (max_calls=1), so the memory it took is given back for the rest of the job. `with_pseudo_depth`:
    --pseudo-depth's model too (describe_encoders)."""
    args = (cfg.encoder, cfg.vae, geometry, cfg.allow_download)
    if with_pseudo_depth and cfg.pseudo_depth is not None:
        args += (cfg.pseudo_depth, cfg.pseudo_depth_scale)
    if ray is None:
        return describe_encoders(*args)
    task = ray.remote(num_cpus=0.25, max_retries=0, max_calls=1)(describe_encoders)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Re2pixError):
            raise e.cause from None
        raise


class Progress:
    """One line every `every` seconds: done, rate, time left, failures, share of time each stage is busy."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool, every: float = 10.0):
        self.what, self.total, self.unit, self.enabled, self.every = what, total, unit, enabled, every
        self.done = self.failed = 0
        self.t0 = self.last = time.time()

    def update(self, n: int, failed: int = 0, busy: dict | None = None) -> None:
        self.done += n
        self.failed += failed
        now = time.time()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        line = f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ~{left:.0f} s left"
        if self.failed:
            line += f", {self.failed} failed"
        if busy:
            line += "; busy " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in busy.items())
        print(line, file=sys.stderr, flush=True)


class ActorStats:
    """Per stage: the actors that ran, and each one's clips and busy seconds (from the rows)."""

    def __init__(self):
        self.stages: dict[str, dict[str, dict]] = {}

    def add(self, row: dict, clips: int) -> None:
        for key, value in row.items():
            if key.startswith("a_"):
                stage = key[2:]
                actor = self.stages.setdefault(stage, {}).setdefault(str(value), {"clips": 0, "busy_s": 0.0})
                actor["clips"] += clips
                actor["busy_s"] += float(row.get(f"t_{stage}", 0.0))

    def busy_share(self, elapsed: float) -> dict:
        return {
            s: sum(a["busy_s"] for a in actors.values()) / max(elapsed * len(actors), 1e-9)
            for s, actors in self.stages.items()
        }

    def summary(self) -> dict:
        return {
            "actors": {s: len(a) for s, a in self.stages.items()},
            "per_actor": {
                s: [
                    {"actor": k[:12], "clips": v["clips"], "busy_s": round(v["busy_s"], 3)}
                    for k, v in sorted(a.items())
                ]
                for s, a in self.stages.items()
            },
        }


def dry_run(cfg: CacheConfig, source, geometry, index, variants) -> dict:
    """What the job would do: counts, the store's size and the encoders' time on a short warm-up."""
    import numpy as np

    from pipeline.ray_cache import EncodeStage, StageResources, read_unit
    from pipeline.units import plan_units

    units = plan_units(index, cfg.unit_clips)
    est = estimated_bytes(index, geometry, len(variants), pseudo_depth_size(cfg, geometry))
    stage = EncodeStage(
        cfg.encoder,
        cfg.vae,
        geometry,
        _random_basis(geometry),
        "cpu",
        cfg.batch_frames,
        cfg.batch_clips,
        StageResources(dino_threads=cfg.dino_threads, vae_threads=cfg.vae_threads),
        len(variants),
        cfg.allow_download,
        cfg.pseudo_depth,
        pseudo_depth_size(cfg, geometry),
    )
    window = int(getattr(stage.encoder, "window", 1))  # a video encoder's frames per feature frame
    unit = read_unit(plan_units(index, 1)[0], source, geometry, variants, True, window)  # one clip
    clips = json.loads(unit["clips"])
    batch = {
        "dino_frames": unit["dino_frames"][None],
        "vae_frames": unit["vae_frames"][None],
        "clips": np.array([unit["clips"]], object),
    }
    t = stage(batch)  # one clip, first call included: an upper bound on the steady rate
    per_clip = float(t["t_encode"][0]) / max(1, len(clips))
    return {
        "dry_run": True,
        "store": cfg.out,
        "clips": len(index.clips),
        "frames": len(index.frames),
        "variants": variants,
        "work_units": len(units),
        "skipped_windows": index.skipped,
        "failures_so_far": len(index.failures),
        "ignored_inputs": index.ignored,
        "store_bytes": {"uncompressed": est, "blosc-zstd (~1.16x on features)": int(est / 1.16)},
        "encoder_s_per_clip_on_this_cpu": round(per_clip, 3),  # first call included
        "encoder_hours_on_one_such_worker": round(per_clip * len(index.clips) * len(variants) / 3600, 3),
    }


def _random_basis(geometry):
    import numpy as np

    from pipeline.store.basis import PCABasis

    d, c = geometry.feature_dim, geometry.num_pca_channels
    return PCABasis(
        np.zeros(d, np.float32), np.ones(d, np.float32), np.eye(c, d, dtype=np.float32), np.ones(c, np.float32)
    )


def _checked_index(cfg: CacheConfig, geometry, source):
    source, geometry, index = build_index(cfg, geometry, source)
    if not index.clips:
        raise Re2pixError(
            f"{cfg.dataset} at {cfg.data_root}: no clip of {geometry.clip_frames} frames "
            f"(skipped windows: {index.skipped or 'none'}; unreadable: {len(index.failures)}; "
            f"ignored: {len(index.ignored)}, listed above)"
        )
    return source, geometry, index


def run_cache(cfg: CacheConfig) -> dict:
    from pipeline.ray_cache import WriteStage
    from pipeline.ray_cluster import start_ray, stop_ray
    from pipeline.store.basis import PCABasis
    from pipeline.store.location import open_group
    from pipeline.store.lock import Lock
    from pipeline.store.writer import StoreWriter
    from pipeline.units import plan_units

    t0 = time.time()
    cfg.out = absolute_location(cfg.out)
    options = cfg.storage_options or None
    variants = ["orig", "hflip"] if cfg.flip else ["orig"]
    source = get_source(cfg)  # a bad dataset or data root: one line, before any cluster starts
    random_weights_notice({"encoder": cfg.encoder, "vae": cfg.vae})  # once the job is under way
    pseudo_depth_size(cfg, resolve_geometry(cfg.geometry))  # a bad --pseudo-depth-scale: before anything runs
    if cfg.dry_run:  # in this process: a dry run starts no cluster
        _, _, geometry, _ = encoder_descriptions(cfg, resolve_geometry(cfg.geometry))
        source, geometry, index = _checked_index(cfg, geometry, source)
        return dry_run(cfg, source, geometry, index, variants)
    finished, grow = finished_store(cfg), []  # refuses a folder that is not ours, --overwrite or not
    if finished is not None and not cfg.overwrite:
        # settled before any encoder loads: a finished store records the geometry its encoders fixed
        from pipeline.store.geometry import Geometry

        source, geometry, index = _checked_index(cfg, Geometry.from_dict(finished["geometry"]), source)
        differs = same_settings(finished, cfg)
        if differs:
            raise Re2pixError(
                f"{cfg.out} is already a finished store made with other settings ({differs[0]}: {differs[1]!r} "
                f"there, {differs[2]!r} now); pass --overwrite to replace it"
            )
        index, *grow = grown_index(cfg, index)
    if grow and grow[0] == len(index.clips) and finished.get("complete"):  # no new clip, no append under way
        counts = finished.get("counts", {})
        return {
            "store": cfg.out,
            "already_complete": True,
            "clips": counts.get("clips"),
            "valid_clips": counts.get("valid_clips"),
            "failed_clips": counts.get("failed_clips", 0),
            "frames": counts.get("frames"),
            "variants": finished.get("variants"),
            "seconds": round(time.time() - t0, 1),
            "skipped_windows": index.skipped,
            "ignored_inputs": index.ignored,
        }
    if grow:  # the source gained clips: they are appended under the store's own settings and basis
        provisional = geometry
    else:  # the configured geometry bounds the store's size before any encoder loads; the encoders may refine it
        source, provisional, index = _checked_index(cfg, resolve_geometry(cfg.geometry), source)
    check_writable(cfg, estimated_bytes(index, provisional, len(variants), pseudo_depth_size(cfg, provisional)))

    lock = Lock(cfg.out, "jobs.cache", options)  # one writer per store: a second cache job is refused here
    lock.acquire()
    cluster = None
    try:
        cluster = start_ray(cfg.ray_address, verbose=cfg.verbose)
        import ray

        # the encoders fix the clip geometry's patch, feature dim, latent channels and compression (in a
        # Ray worker: the driver never holds a model)
        encoders, latent_norm, geometry, footprint = encoder_descriptions(cfg, provisional, ray, True)
        pseudo_depth = encoders.pop("pseudo_depth", None)  # a target, not an encoder of the features
        from pipeline.encoders.registry import cache_precision

        for name, entry in encoders.items():  # what the encoder actors compute in: inference uses the same
            entry["precision"] = cache_precision(name, encoder_device(cfg, cluster))
        if geometry != provisional and not grow:  # a grown store's own geometry: StoreWriter refuses another
            source, geometry, index = _checked_index(cfg, geometry, source)
            check_writable(cfg, estimated_bytes(index, geometry, len(variants), pseudo_depth_size(cfg, geometry)))
        check_visible_from_every_node(cfg, cluster)
        window = int(encoders["dinov2"].get("window", 1))  # a video encoder's frames per feature frame
        basis = None
        if cfg.pca:
            from pipeline.pca import load_basis

            basis = load_basis(absolute_location(cfg.pca), storage_options=options)
        elif not cfg.overwrite:  # resuming or growing: reuse the basis the store was started with
            try:
                g = open_group(cfg.out, mode="r", storage_options=options)
                if (grow or not g.attrs.get("complete", True)) and "pca" in g:
                    basis = PCABasis.load(g["pca"])
            except (FileNotFoundError, OSError, KeyError, ValueError):
                pass
        if basis is None:
            basis = fit_basis(cfg, source, geometry, index, ray, cluster, window, footprint)

        writer = StoreWriter.create(
            cfg.out,
            index=index,
            geometry=geometry,
            basis=basis,
            source_info=source.describe(),
            encoders=encoders,
            latent_norm=latent_norm,
            variants=variants,
            clip_stride=cfg.stride,
            channel_chunk=cfg.channel_chunk,
            compression=cfg.compression,
            overwrite=cfg.overwrite,
            storage_options=options,
            extra={"cache_config": recorded_config(cfg)},
            pseudo_depth=pseudo_depth,
            grow=tuple(grow) or None,
        )
        # an append's units are named by its generation: the store's earlier units keep their markers
        prefix = f"append{writer.manifest['appending']['generation']}-" if grow else ""
        units = plan_units(index, cfg.unit_clips, *grow, prefix=f"{prefix}unit")
        done = writer.done_units()
        todo = [u for u in units if u.unit_id not in done]
        listed = {(f["clip_id"], f["file"]) for r in writer.unit_records() for f in r["failures"]}
        unlisted = [f for f in listed_inputs(index) if (f["clip_id"], f["file"]) not in listed]
        if unlisted:  # inputs that made no clip (unreadable or ignored): listed like failed clips
            writer.mark_unit_done(f"{prefix}index", clip_rows=[], frame_rows=[], failures=unlisted)
        if len(todo) < len(units):
            print(f"resuming {cfg.out}: {len(units) - len(todo)} of {len(units)} work units already done")

        rows, stats, pools, res = [], ActorStats(), {}, None
        if todo:
            ds, pools, res, _ = encoding_plan(
                ray, cfg, cluster, todo, source, geometry, basis, variants, True, window, footprint
            )
            ds = ds.map_batches(
                WriteStage,
                fn_constructor_args=(cfg.out, options),
                batch_size=1,
                compute=_pool(ray, pools["write"]),
                **res.task_kwargs("write"),
            )
            progress = Progress("cache", sum(len(u.clips) for u in todo), "clips", cfg.progress)
            for row in ds.iter_rows():
                n = int(row["clips"]) + int(row["failed"])
                stats.add(row, n)
                progress.update(n, int(row["failed"]), stats.busy_share(time.time() - progress.t0))
                rows.append((time.time(), n, float(row["ready_encode"])))
        counts = writer.finalize([u.unit_id for u in units])
    finally:
        stop_ray(cluster)
        lock.release()
    stage_seconds = {s: round(sum(a["busy_s"] for a in actors.values()), 3) for s, actors in stats.stages.items()}
    summary = {
        "store": cfg.out,
        "clips": counts["clips"],
        "valid_clips": counts["valid_clips"],
        "failed_clips": counts["failed_clips"],
        "frames": counts["frames"],
        "variants": variants,
        "seconds": round(time.time() - t0, 1),
        "encoded_units": len(todo),
        "appended_clips": len(index.clips) - grow[0] if grow else 0,
        "skipped_windows": index.skipped,
        "unreadable_inputs": len(index.failures),
        "ignored_inputs": index.ignored,
        "ray": {"cluster": cluster.kind, "nodes": cluster.nodes, "cpus": cluster.cpus, "gpus": cluster.gpus},
        "pools": {k: list(v) for k, v in pools.items()},
        # host memory each actor declared to Ray, by stage
        "declared_mib": {
            stage: round(getattr(res, f"{name}_memory") / 2**20)
            for stage, name in (("encode", "encoder"), ("decode", "decode"), ("write", "write"))
        }
        if res
        else {},
        # throughput once every actor is up: clips after the last encoder was ready / time since then
        "steady_clips_per_s": _steady_rate(rows),
        "stage_seconds": stage_seconds,
        **stats.summary(),
    }
    return summary


def _steady_rate(rows) -> float | None:
    """Clips/s once every encoder actor had loaded its model (Ray and actor start-up excluded)."""
    if not rows:
        return None
    ready = max(r for _, _, r in rows)
    done = [(t, n) for t, n, _ in rows if t > ready]
    return sum(n for _, n in done) / (done[-1][0] - ready) if done else None


def main(argv=None) -> int:
    cfg, _ = parse_config(CacheConfig, "cache", argv, description=__doc__)
    summary = run_cache(cfg)
    if summary.get("dry_run"):
        print(json.dumps(summary))
        return 0
    if summary.get("already_complete"):
        print(f"{summary['store']} is already complete, nothing to do ({summary['valid_clips']} clips)")
    else:
        if summary["appended_clips"]:
            print(f"appended {summary['appended_clips']} new clips to {summary['store']} under its own basis")
        print(
            f"cached {summary['valid_clips']} of {summary['clips']} clips into {summary['store']} in "
            f"{summary['seconds']} s ({summary['failed_clips']} failed; skipped windows: "
            f"{summary['skipped_windows'] or 'none'}; ignored inputs: {len(summary['ignored_inputs'])})"
        )
    if summary["failed_clips"] or summary["ignored_inputs"]:
        where = f"python -m jobs.store info {summary['store']}"
        print(f"failed clips and ignored inputs are listed with file and reason: {where}")
    print(json.dumps(summary))
    if 0 <= cfg.max_failures < summary["failed_clips"]:
        raise TooManyFailuresError(
            f"{summary['failed_clips']} clips failed, more than --max-failures "
            f"{cfg.max_failures} (the store is finished and lists them)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main, resume_hint=RESUME_HINT))
