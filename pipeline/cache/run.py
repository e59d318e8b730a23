"""Cache a dataset into a store (`python -m jobs.cache` parses the command line and calls run_cache):
source -> clip index -> cheap checks -> (PCA basis: reuse --pca, or fit on a sample) -> Ray Data:
decode+resize -> encode (feature encoder -> PCA -> float16, video VAE; one fused actor per GPU) -> store.
A rerun of the same config resumes a killed job and returns at once on a finished store; where the source
gained scenes since, it appends only their clips, under the store's own basis and settings (StoreWriter._grow).
A dry run builds the index and times the encoders on one clip in this process, and writes nothing."""

from __future__ import annotations

import json
import time

from ..errors import Re2pixError
from ..store.geometry import resolve_geometry
from .basis import encoder_descriptions, fit_basis
from .config import CacheConfig, absolute_location, pseudo_depth_size, recorded_config
from .index import _checked_index, get_source, listed_inputs
from .plan import _pool, encode_spec, encoding_plan
from .preflight import (
    check_visible_from_every_node,
    check_writable,
    estimated_bytes,
    finished_store,
    grown_index,
    same_settings,
)
from .progress import ActorStats, Progress
from .resources import StageResources, encoder_device


def dry_run(cfg: CacheConfig, source, geometry, index, variants) -> dict:
    """What the job would do: counts, the store's size and the encoders' time on a short warm-up."""
    import numpy as np

    from pipeline.units import plan_units

    from .read import read_unit
    from .stages import EncodeStage

    units = plan_units(index, cfg.unit_clips)
    est = estimated_bytes(index, geometry, len(variants), pseudo_depth_size(cfg, geometry))
    res = StageResources(dino_threads=cfg.dino_threads, vae_threads=cfg.vae_threads)
    stage = EncodeStage(encode_spec(cfg, geometry, _random_basis(geometry), "cpu", res, len(variants)))
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


def run_cache(cfg: CacheConfig, notice=None) -> dict:
    """The job (module docstring): a summary of the store, or what a dry run would do. `notice(specs)`, once
    the source opened: jobs.cache passes jobs.cli.random_weights_notice ({"encoder": ..., "vae": ...})."""
    from pipeline.ray_cluster import start_ray, stop_ray
    from pipeline.store.basis import PCABasis
    from pipeline.store.location import open_group
    from pipeline.store.lock import Lock

    from .stages import WriteStage

    t0 = time.time()
    cfg.out = absolute_location(cfg.out)
    options = cfg.storage_options or None
    variants = ["orig", "hflip"] if cfg.flip else ["orig"]
    source = get_source(cfg)  # a bad dataset or data root: one line, before any cluster starts
    if notice is not None:
        notice({"encoder": cfg.encoder, "vae": cfg.vae})  # once the job is under way
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

        writer, units = start_store(
            cfg, source, index, geometry, basis, encoders, latent_norm, variants, pseudo_depth=pseudo_depth, grow=grow
        )
        prefix = append_prefix(writer, grow)
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


def start_store(
    cfg: CacheConfig, source, index, geometry, basis, encoders, latent_norm, variants, *, pseudo_depth=None, grow=()
):
    """The store's writer (a new store, the unfinished one resumed, or `grow` = (clips, frames) it holds
    appended to: StoreWriter.create) and the work units its clips are encoded in."""
    from pipeline.store.writer import StoreWriter
    from pipeline.units import plan_units

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
        storage_options=cfg.storage_options or None,
        extra={"cache_config": recorded_config(cfg)},
        pseudo_depth=pseudo_depth,
        grow=tuple(grow) or None,
    )
    return writer, plan_units(index, cfg.unit_clips, *grow, prefix=f"{append_prefix(writer, grow)}unit")


def append_prefix(writer, grow) -> str:
    """An append's units are named by its generation: the store's earlier units keep their markers."""
    return f"append{writer.manifest['appending']['generation']}-" if grow else ""


def _steady_rate(rows) -> float | None:
    """Clips/s once every encoder actor had loaded its model (Ray and actor start-up excluded)."""
    if not rows:
        return None
    ready = max(r for _, _, r in rows)
    done = [(t, n) for t, n, _ in rows if t > ready]
    return sum(n for _, n in done) / (done[-1][0] - ready) if done else None
