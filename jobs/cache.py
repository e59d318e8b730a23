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

import json
import sys

from jobs.cli import random_weights_notice, run
from jobs.config import parse_config
from pipeline.cache import CacheConfig, run_cache
from pipeline.errors import TooManyFailuresError

RESUME_HINT = "rerun the same command to resume"


def main(argv=None) -> int:
    cfg, _ = parse_config(CacheConfig, "cache", argv, description=__doc__)
    summary = run_cache(cfg, notice=random_weights_notice)
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
