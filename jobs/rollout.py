"""Write Stage 1's predicted future features into stores, for Stage 2's mixed supervision:
`python -m jobs.rollout --checkpoint runs/demo/train/stage1 --store runs/demo/store.zarr`.

For every clip row (every flip variant, so a flipped latent never meets unflipped predictions) the
trained Stage 1 rolls out latent frames 4, 5, 6 from the clip's ground-truth features 0-3 with its
sliding 4-frame window, and the result goes to clips/pred_features [rows, 3, H, W, C] float16 with the
checkpoint's weight fingerprint in its attributes (channels past the ones the model predicts are
zero: the array attribute `channels` says how many it predicted). A diffusion Stage 1
(`--stage1 '{"diffusion": true}'`, model/stage1_diffusion.py) writes sampled features, the same for a
clip however the rows are batched or the job interrupted.

Resumable: rows are done in chunks of --chunk-rows; each finished chunk is recorded atomically as
progress/rollout-{fingerprint[:16]}/chunk-NNNNNN.json (a folder beside the cache job's unit
records, which stay the only *.json directly under progress/). A rerun skips recorded chunks and
marks the array complete when every chunk is there. Under torchrun the chunks are split over ranks.
Rollouts of another checkpoint are refused unless --overwrite. The writer is inference/rollout.py.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from jobs.config import DEMO_RUNS, DEMO_STORE, parse_config


@dataclass
class RolloutConfig:
    checkpoint: str = field(
        default=f"{DEMO_RUNS}/stage1",
        metadata={"help": "a Stage 1 run dir (its latest checkpoint) or a checkpoint folder"},
    )
    store: str = field(default=DEMO_STORE, metadata={"help": "store path/URL, several separated by commas"})
    weights: str = field(default="auto", metadata={"help": "auto (EMA when the checkpoint has it), ema or model"})
    batch_size: int = field(default=8, metadata={"help": "clip rows per Stage 1 call"})
    chunk_rows: int = field(default=64, metadata={"help": "clip rows per progress record (the resume unit)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on GPU"})
    overwrite: bool = field(default=False, metadata={"help": "replace rollouts of another checkpoint, start over"})
    progress: bool = field(default=True, metadata={"help": "a progress line while rolling out"})
    storage_options: dict = field(default_factory=dict, metadata={"help": "JSON fsspec options for store URLs"})


def run_rollout(cfg: RolloutConfig, runtime=None) -> list[dict]:
    """The job: a runtime (torchrun's ranks, or one device), then inference/rollout.py's write_rollouts."""
    from inference.rollout import RolloutOptions, write_rollouts
    from model.loop import init_runtime

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    runtime = runtime or init_runtime(cfg.device)
    options = RolloutOptions(
        batch_size=cfg.batch_size,
        chunk_rows=cfg.chunk_rows,
        amp=cfg.amp,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        storage_options=cfg.storage_options,
    )
    return write_rollouts(cfg.checkpoint, cfg.store, runtime, options, weights=cfg.weights)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(RolloutConfig, "rollout", argv, description=__doc__)
    results = run_rollout(cfg)
    for r in results:
        print(f"{r['store']}: {r['rows']} rows, {r['written']} written now, checkpoint {r['fingerprint']}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from jobs.cli import run

    sys.exit(run(main, resume_hint="rerun the same command to resume"))
