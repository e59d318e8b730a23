"""Stage 1's predicted future features written into stores, for Stage 2's mixed supervision (the
library behind `python -m jobs.rollout` and `jobs.train --stage all`).

For every clip row (every flip variant, so a flipped latent never meets unflipped predictions) the
trained Stage 1 rolls out latent frames 4, 5, 6 from the clip's ground-truth features 0-3 with its
sliding 4-frame window, and the result goes to clips/pred_features [rows, 3, H, W, C] float16 with the
checkpoint's weight fingerprint in its attributes (channels past the ones the model predicts are
zero: the array attribute `channels` says how many it predicted). A diffusion Stage 1
(model/stage1_diffusion.py) writes sampled features, the same for a clip however the rows are batched
or the job interrupted.

Resumable: rows are done in chunks of --chunk-rows; each finished chunk is recorded atomically as
progress/rollout-{fingerprint[:16]}/chunk-NNNNNN.json (a folder beside the cache job's unit
records, which stay the only *.json directly under progress/). A rerun skips recorded chunks and
marks the array complete when every chunk is there. Under torchrun the chunks are split over ranks.
Rollouts of another checkpoint are refused unless --overwrite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("re2pix.rollout")


def _marker_dir(root: str, fingerprint: str) -> str:
    return f"{root}/progress/rollout-{fingerprint[:16]}"


@dataclass(frozen=True)
class RolloutOptions:
    """How rollouts are written, the same for every store."""

    batch_size: int = 8  # clip rows per Stage 1 call
    chunk_rows: int = 64  # clip rows per progress record (the resume unit)
    amp: bool = True  # bf16 autocast on GPU
    overwrite: bool = False  # replace rollouts of another checkpoint and start over
    progress: bool = True
    storage_options: dict | None = None


def rollout_store(stage1, location: str, runtime, options: RolloutOptions = RolloutOptions()) -> dict:
    """Write (or finish writing) the rollouts of a Stage 1 (inference/stages.py's LoadedModel) into one store;
    returns a summary."""
    from model.loop import autocast
    from model.stage1 import rollout
    from pipeline.store.format import StoreError
    from pipeline.store.location import write_atomic
    from pipeline.store.reader import Store
    from pipeline.store.writer import StoreWriter, digest

    batch_size, chunk_rows, amp, overwrite = options.batch_size, options.chunk_rows, options.amp, options.overwrite
    storage = options.storage_options or None
    store = Store(location, storage)
    stage1.check_space(location, store.manifest)  # predictions of another space must never reach Stage 2
    model, fingerprint, mcfg = stage1.model, stage1.fingerprint, stage1.model.config
    g = store.geometry
    if tuple(mcfg.feature_hw) != tuple(g.feature_hw) or mcfg.num_pca_channels > store.num_channels:
        raise StoreError(
            f"the Stage 1 model takes {mcfg.num_pca_channels} channels on a {tuple(mcfg.feature_hw)} "
            f"grid; {location} holds {store.num_channels} on {g.feature_hw}"
        )
    if mcfg.context_frames != g.context_latents:
        raise StoreError(f"the model has {mcfg.context_frames} context frames, the store {g.context_latents}")
    summary = {"store": location, "fingerprint": fingerprint, "rows": len(store) * store.num_variants, "written": 0}
    if store.has_pred_features and store.pred_features_fingerprint == fingerprint and not overwrite:
        log.info("%s already holds the rollouts of %s", location, fingerprint[:12])
        return summary

    existing = store.pred_features_fingerprint
    if existing not in (None, fingerprint) and not overwrite:  # every rank refuses alike
        raise StoreError(
            f"{location} holds rollouts of checkpoint {existing[:12]}; pass --overwrite to replace "
            f"them with {fingerprint[:12]}"
        )
    writer = StoreWriter(location, storage)
    fs, marks = writer.fs, _marker_dir(writer.root, fingerprint)
    if runtime.is_main:
        if overwrite and fs.exists(marks):  # start over
            fs.rm(marks, recursive=True)
        # refuses rollouts of another checkpoint, finished or not, unless --overwrite
        arr = writer.create_pred_features(fingerprint, overwrite=overwrite)
        arr.attrs.update({"channels": mcfg.num_pca_channels, "chunk_rows": chunk_rows})
    runtime.barrier()

    work = [(i, v) for i in range(len(store)) for v in range(store.num_variants)]  # every clip row
    chunks = [work[k : k + chunk_rows] for k in range(0, len(work), chunk_rows)]
    done = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{marks}/chunk-*.json")}
    mine = [k for k in range(len(chunks)) if k % runtime.world == runtime.rank and f"chunk-{k:06d}.json" not in done]
    c, C, n = mcfg.num_pca_channels, store.num_channels, mcfg.context_frames
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(chunks[k]) for k in mine),
        desc=f"rollout {location}",
        unit="row",
        disable=not (options.progress and runtime.is_main),
    )
    t0 = time.perf_counter()
    for k in mine:
        digests = {}
        for b in range(0, len(chunks[k]), batch_size):
            rows = chunks[k][b : b + batch_size]
            feats = np.stack([store.read_features(i, channels=c, variant=v)[:n] for i, v in rows])  # [B, 4, H, W, c]
            context = torch.from_numpy(feats).float().to(runtime.device)
            with torch.no_grad(), autocast(runtime, amp):
                pred = rollout(model, context, steps=g.future_latents)  # [B, 3, H, W, c]
            pred = pred.float().cpu().numpy().astype(np.float16)
            if not np.isfinite(pred).all():  # a float16 overflow, or a diverged model: never written
                ids = [store.clip_ids[i] for i, _ in rows]
                raise StoreError(
                    f"{location}: Stage 1 {fingerprint[:12]} predicts NaN/Inf features for clips {ids}; nothing "
                    "of them is written"
                )
            if c < C:  # the channels the model does not predict are zero
                pred = np.concatenate([pred, np.zeros((*pred.shape[:-1], C - c), np.float16)], axis=-1)
            for (i, v), p in zip(rows, pred):
                row = store.row(i, v)
                writer.write_pred_features(row, p)
                digests[str(row)] = digest(p)
            bar.update(len(rows))
        record = {"chunk": k, "fingerprint": fingerprint, "rows": sorted(int(r) for r in digests), "digests": digests}
        write_atomic(fs, f"{marks}/chunk-{k:06d}.json", json.dumps(record, sort_keys=True).encode())
        summary["written"] += len(chunks[k])
    bar.close()
    runtime.barrier()
    if runtime.is_main:
        done = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{marks}/chunk-*.json")}
        missing = [k for k in range(len(chunks)) if f"chunk-{k:06d}.json" not in done]
        if missing:
            raise StoreError(f"{location}: rollout chunks {missing[:5]} are not done; rerun to resume")
        writer.finish_pred_features()
    runtime.barrier()
    summary["seconds"] = time.perf_counter() - t0
    return summary


def write_rollouts(
    checkpoint: str,
    stores: str,
    runtime,
    options: RolloutOptions = RolloutOptions(),
    weights: str = "auto",
) -> list[dict]:
    """Roll out the Stage 1 at `checkpoint` (a run dir or a checkpoint folder; `weights`: auto, ema or model)
    into every store of `stores` (paths/URLs separated by commas), each under its writer lock (rank 0 holds
    it under torchrun); returns one summary per store (rollout_store)."""
    from inference.stages import load_model
    from model.data import parse_store_list
    from pipeline.store.lock import locked

    stage1 = load_model(checkpoint, ("stage1", "stage1_diffusion"), weights, runtime.device)
    if runtime.is_main:
        log.info("rollout of %s (weights %s)", stage1.checkpoint, stage1.fingerprint[:12])
    locations, _ = parse_store_list(stores)  # mixing weights only matter to training
    done, storage = [], options.storage_options or None
    for s in locations:  # one writer per store; under torchrun rank 0 holds the lock
        with locked(s, "jobs.rollout", storage) if runtime.is_main else contextlib.nullcontext():
            done.append(rollout_store(stage1, s, runtime, options))
    return done
