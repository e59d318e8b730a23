"""The evaluation's JSON record (`jobs.evaluate --out`), schema "re2pix-evaluation/1":

  {"schema", "store", "dataset", "split", "clips", "clip_ids", "samples", "annotated_frame",
   "reference": {"pixels": "vae_reconstruction", "note", "frames": {"pixels": "source_frames"} or
                 {"pixels": null, "why"} (null without decoding)},
   "sampler": {...}, "checkpoints": {...},
   "stage1": {metric: number},
   "models": {"re2pix": {metric: {"mean", "std", "runs": [one value per sampling run]}}, "baseline": ...,
              "copy_last": ... (one deterministic run)},
   "reference_metrics": {metric: number}, "skipped": {metric: reason}, "seconds"}

Pixel metrics come twice: `psnr`, `ssim`, `fid`, `fvd` (and `psnr/f13`...) against the VAE reconstruction
of the stored latents, and `psnr_vs_frames`, ... against the source's real frames when they were readable.
`reference_metrics` scores the reconstruction itself against the frames: the VAE's ceiling.

std is the sample standard deviation across runs (ddof 1; 0 for one run); a value that is not finite
(e.g. PSNR of identical frames) is written as null.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "re2pix-evaluation/1"
REFERENCE_NOTE = (
    "psnr, ssim, fid and fvd compare the decoded predictions (frames 13-24) with the VAE reconstruction of "
    "the stored ground-truth latents (the store holds latents, not pixels); the *_vs_frames metrics compare "
    "them with the source's real frames, resized as the cache job resized them, when the source could be "
    "read here (reference.frames); reference_metrics holds the reconstruction's own *_vs_frames scores."
)


def evaluation_record(store: str, manifest: dict, measured: dict, *, decoded: bool, **run) -> dict:
    """The record of one evaluation: `measured` as inference.evaluation.evaluate_store returns it; `run`
    holds clips, samples, annotated_frame, sampler, features, checkpoints, skipped and seconds."""
    return {
        "schema": SCHEMA,
        "store": store,
        "dataset": manifest.get("dataset"),
        "split": manifest.get("split"),
        "clips": run["clips"],
        "clip_ids": measured["clip_ids"],
        "samples": run["samples"],
        "annotated_frame": run["annotated_frame"],
        "reference": {
            "pixels": "vae_reconstruction" if decoded else None,
            "note": REFERENCE_NOTE,
            "frames": measured["frames_reference"],
        },
        "sampler": run["sampler"],
        "features": run.get("features", "forecast"),  # what Re2Pix read for the future frames
        "checkpoints": run["checkpoints"],
        "stage1": measured["stage1"],
        "models": measured["models"],
        "reference_metrics": measured["reference_metrics"],
        "skipped": run["skipped"],
        "seconds": run["seconds"],
    }


def write_json(path, value: dict) -> Path:
    """`value` as indented JSON at `path` (its folder made); a value that is not finite is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, allow_nan=False))
    return path
