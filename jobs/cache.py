"""Cache a dataset into a store: `python -m jobs.cache --preset tiny --dataset synthetic --out STORE`.

source -> clip index -> (PCA basis: reuse --pca, or fit on a sample) -> Ray Data: decode+resize ->
feature encoder (--encoder: DINOv2-Reg, SigLIP-2, any transformers backbone) -> PCA -> float16 and the
video VAE (--vae: WAN2.1, Wan2.2) -> store. A rerun of the same command resumes a killed job;
`RAY_ADDRESS` points it at a cluster (else a local one is started).

Exit status: 0 when the store is finished with at most --max-failures failed clips (-1: any number),
2 when more failed (the store is still finished and lists them), 1 on errors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from jobs.config import parse_config


@dataclass
class CacheConfig:
    dataset: str = field(default="synthetic",
                         metadata={"help": "synthetic, videos, nuscenes, cityscapes, kitti, covla"})
    data_root: str | None = field(default=None, metadata={"help": "dataset folder (not needed for synthetic)"})
    split: str = "train"
    source_options: dict = field(default_factory=dict, metadata={"help": "JSON options for the dataset adapter"})
    out: str = field(default="runs/demo/store.zarr", metadata={"help": "store path or fsspec URL"})
    geometry: str = field(default="tiny", metadata={"help": "tiny, paper, or JSON overrides of the paper's"})
    encoder: str = field(default="tiny", metadata={
        "help": "feature encoder: 'tiny', a DINOv2-Reg hub id or folder, 'siglip2:SPEC', 'hf:SPEC' or JSON "
                "(pipeline/encoders/registry.py)"})
    vae: str = field(default="tiny", metadata={"help": "'tiny', 'tiny-wan2.2', a WAN2.1/Wan2.2 VAE hub id or folder"})
    allow_download: bool = field(default=False, metadata={"help": "let transformers/diffusers download weights"})
    pca: str | None = field(default=None, metadata={"help": "reuse this PCA basis (path/URL) instead of fitting"})
    pca_frames: int = field(default=512, metadata={"help": "frames sampled to fit the PCA basis"})
    stride: int = field(default=4, metadata={"help": "frames between clip starts"})
    flip: bool = field(default=False, metadata={"help": "also cache each clip flipped left-right"})
    unit_clips: int = field(default=8, metadata={"help": "clips per work unit (the resume granularity)"})
    batch_frames: int = 16
    batch_clips: int = 1
    max_clips: int | None = field(default=None, metadata={"help": "cache only the first N clips"})
    max_failures: int = -1
    compression: str = "blosc-zstd"
    channel_chunk: int = 128
    decode_actors: int = field(default=1, metadata={"help": "CPU actors reading and resizing frames"})
    dino_actors: int = 1
    vae_actors: int = 1
    dino_threads: int = field(default=1, metadata={"help": "torch threads per DINOv2 actor (CPU-only machines)"})
    vae_threads: int = field(default=0, metadata={"help": "torch threads per VAE actor on CPU; 0: every CPU "
                                                           "(the VAE is ~97% of the work at real size)"})
    overwrite: bool = False
    progress: bool = True


def _ray_init():
    import ray
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, **({} if address else {"num_cpus": os.cpu_count()}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def _resources(ray, cfg: CacheConfig):
    from pipeline.ray_cache import StageResources
    if ray.cluster_resources().get("GPU", 0):
        return StageResources(gpus=1.0), "cuda"
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return StageResources(dino_threads=cfg.dino_threads, vae_threads=cfg.vae_threads or cpus), "cpu"


def resolve_geometry(spec: str):
    """'tiny', 'paper', or a JSON object of fields that differ from the paper's geometry."""
    from pipeline.store.geometry import GEOMETRIES, PAPER, Geometry
    if spec in GEOMETRIES:
        return GEOMETRIES[spec]
    try:
        return Geometry.from_dict({**PAPER.to_dict(), **json.loads(spec)})
    except (json.JSONDecodeError, TypeError) as e:
        raise SystemExit(f"--geometry must be {' or '.join(GEOMETRIES)} or a JSON object, got {spec!r}") from e


def build_index(cfg: CacheConfig, geometry=None):
    from pipeline.clips import ClipIndex, build_clip_index
    from pipeline.sources import get_source
    geometry = geometry or resolve_geometry(cfg.geometry)
    source = get_source(cfg.dataset, cfg.data_root, cfg.split, **cfg.source_options)
    index = build_clip_index(source, geometry, stride=cfg.stride, progress=cfg.progress)
    if cfg.max_clips is not None and len(index.clips) > cfg.max_clips:
        keep = index.clips[: cfg.max_clips]
        used = sorted({r for c in keep for r in c.feature_rows})
        remap = {r: i for i, r in enumerate(used)}
        keep = [type(c)(c.clip_id, c.scene, c.start, c.frames, tuple(remap[r] for r in c.feature_rows)) for c in keep]
        index = ClipIndex(keep, [index.frames[r] for r in used], index.skipped)
    return source, geometry, index


def _decode_and_dino(ray, cfg: CacheConfig, units, source, geometry, basis, variants, with_clips: bool,
                     window: int = 1):
    """The plan's first stages: one row per unit -> decoded, resized frames -> DINOv2 (projected
    with `basis`, or moments for fitting one when it is None). Returns (dataset, resources, device)."""
    from pipeline.ray_cache import DecodeStage, DinoStage
    res, device = _resources(ray, cfg)
    ds = ray.data.from_items([{"plan": u.to_json()} for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(DecodeStage, fn_constructor_args=(source, geometry, variants, with_clips, window), batch_size=1,
                        num_cpus=res.task_cpus, compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors))
    ds = ds.map_batches(DinoStage, fn_constructor_args=(cfg.encoder, geometry, basis, device, cfg.batch_frames,
                                                         res.dino_threads, cfg.allow_download),
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.dino_actors), **res.actor_kwargs())
    return ds, res, device


def fit_basis(cfg: CacheConfig, source, geometry, index, ray, window: int = 1):
    """First pass: DINOv2 on an even sample of feature frames, moments merged in float64."""
    from pipeline.pca import PCAAccumulator
    from pipeline.units import plan_frames
    units = plan_frames(index, cfg.pca_frames)
    ds, _, _ = _decode_and_dino(ray, cfg, units, source, geometry, None, ["orig"], with_clips=False, window=window)
    acc = PCAAccumulator(geometry.feature_dim)
    from tqdm.auto import tqdm
    with tqdm(total=sum(len(u.own) for u in units), desc="pca sample", unit="frame", disable=not cfg.progress) as bar:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            acc.merge(PCAAccumulator.from_moments(batch["count"][0], batch["mean"][0], batch["m2"][0]))
            bar.update(len(json.loads(str(batch["own_rows"][0]))))
    return acc.to_basis(geometry.num_pca_channels)


def encoder_descriptions(cfg: CacheConfig, geometry) -> tuple[dict, dict, object]:
    """Describe the encoders for the manifest (loads them once in the driver, on CPU, to hash weights),
    and the geometry with the sizes they fix (patch, feature dim, latent channels, compression)."""
    from pipeline.encoders import derive_geometry, load_encoder, load_vae
    enc = load_encoder(cfg.encoder, input_hw=geometry.dino_input_hw, device="cpu", allow_download=cfg.allow_download)
    vae = load_vae(cfg.vae, input_hw=geometry.vae_input_hw, device="cpu", allow_download=cfg.allow_download)
    # the manifest's "dinov2" entry is the feature encoder, whichever it is: its "name" says which
    return ({"dinov2": enc.describe(), "vae": vae.describe()}, {"mean": vae.latents_mean, "std": vae.latents_std},
            derive_geometry(geometry, enc, vae))


def run_cache(cfg: CacheConfig) -> dict:
    from tqdm.auto import tqdm

    from pipeline.ray_cache import VaeStage, WriteStage
    from pipeline.store.basis import PCABasis
    from pipeline.store.location import open_group
    from pipeline.store.writer import StoreWriter
    from pipeline.units import plan_units

    t0 = time.time()
    encoders, latent_norm, geometry = encoder_descriptions(cfg, resolve_geometry(cfg.geometry))
    source, geometry, index = build_index(cfg, geometry)
    if not index.clips:
        raise SystemExit(f"{cfg.dataset} at {cfg.data_root}: no clip of {geometry.clip_frames} frames "
                         f"(skipped windows: {index.skipped or 'none'})")
    ray = _ray_init()
    variants = ["orig", "hflip"] if cfg.flip else ["orig"]
    window = int(encoders["dinov2"].get("window", 1))  # a video encoder's frames per feature frame

    basis = None
    if cfg.pca:
        from pipeline.pca import load_basis
        basis = load_basis(cfg.pca)
    elif not cfg.overwrite:  # resuming: reuse the basis the unfinished store was started with
        try:
            g = open_group(cfg.out, mode="r")
            if not g.attrs.get("complete", True) and "pca" in g:
                basis = PCABasis.load(g["pca"])
        except (FileNotFoundError, OSError, KeyError, ValueError):
            pass
    if basis is None:
        basis = fit_basis(cfg, source, geometry, index, ray, window)

    writer = StoreWriter.create(
        cfg.out, index=index, geometry=geometry, basis=basis, source_info=source.describe(), encoders=encoders,
        latent_norm=latent_norm, variants=variants, clip_stride=cfg.stride, channel_chunk=cfg.channel_chunk,
        compression=cfg.compression, overwrite=cfg.overwrite,
        extra={"cache_config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "progress")}})
    units = plan_units(index, cfg.unit_clips)
    done = writer.done_units()
    todo = [u for u in units if u.unit_id not in done]
    if done:
        print(f"resuming {cfg.out}: {len(units) - len(todo)} of {len(units)} work units already done")

    rows, stage_seconds = [], {}  # (time a unit was written, its clips, when its encoders were ready)
    if todo:
        ds, res, device = _decode_and_dino(ray, cfg, todo, source, geometry, basis, variants, with_clips=True,
                                           window=window)
        ds = ds.map_batches(VaeStage, fn_constructor_args=(cfg.vae, geometry, device, cfg.batch_clips,
                                                            res.vae_threads, len(variants), cfg.allow_download),
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.vae_actors),
                            **res.actor_kwargs())
        ds = ds.map_batches(WriteStage, fn_constructor_args=(cfg.out,), batch_size=1, num_cpus=res.task_cpus,
                            compute=ray.data.ActorPoolStrategy(size=1))
        total = sum(len(u.clips) for u in todo)
        failed = 0
        with tqdm(total=total, desc="cache", unit="clip", disable=not cfg.progress) as bar:
            for row in ds.iter_rows():
                n = int(row["clips"]) + int(row["failed"])
                bar.update(n)
                failed += int(row["failed"])
                if failed:
                    bar.set_postfix(failed=failed)
                last_row_at = time.time()
                rows.append((last_row_at, n, max(float(v) for k, v in row.items() if k.startswith("ready_"))))
                for k, v in row.items():
                    if k.startswith("t_"):
                        stage_seconds[k[2:]] = stage_seconds.get(k[2:], 0.0) + float(v)
    counts = writer.finalize([u.unit_id for u in units])
    summary = {"store": cfg.out, "clips": counts["clips"], "valid_clips": counts["valid_clips"],
               "failed_clips": counts["failed_clips"], "frames": counts["frames"], "variants": variants,
               "seconds": round(time.time() - t0, 1), "skipped_windows": index.skipped,
               # throughput once every actor is up: clips after the first finished unit / time since it
               "steady_clips_per_s": _steady_rate(rows),
               "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()}}
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
    from pipeline.encoders import EncoderWeightsError
    from pipeline.sources.base import SourceError
    from pipeline.store.format import StoreError
    try:
        summary = run_cache(cfg)
    except (SourceError, StoreError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"cached {summary['valid_clips']} of {summary['clips']} clips into {summary['store']} in "
          f"{summary['seconds']} s ({summary['failed_clips']} failed; skipped windows: "
          f"{summary['skipped_windows'] or 'none'})")
    if summary["failed_clips"]:
        print(f"failed clips are listed with file and reason: python -m jobs.store info {cfg.out}")
    print(json.dumps(summary))
    if 0 <= cfg.max_failures < summary["failed_clips"]:
        print(f"error: {summary['failed_clips']} clips failed, more than --max-failures {cfg.max_failures}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
