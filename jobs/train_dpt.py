"""Train the DPT segmentation and depth heads (paper appendix 9.3) on a store's cached features:
`python -m jobs.train_dpt --preset tiny --store runs/demo/store.zarr --out runs/demo/heads`.

Inputs: every clip's feature frames (clip frames 0, 4, ..., 24 for the 4x temporal VAE), PCA features
un-projected with the store's basis (`PCABasis.unproject`, the rank-c estimate of the encoder's block
features) and split into the four blocks (inference/dpt.py). Labels, per feature frame:
 * `--labels source`: the store's own source, reopened from its manifest, when it renders ground truth
   (`Source.read_targets`: the synthetic set's classes and depth in metres);
 * `--labels cityscapes`: gtFine trainIds of the annotated frame only (`--annotated-frame`, Cityscapes: 19);
   segmentation only;
 * `--depth-labels pseudo-depth` (or `--labels pseudo-depth`, depth only): the store's own frames/pseudo_depth,
   Depth Anything V2's relative disparity that `jobs.cache --pseudo-depth` stored for every feature frame (the
   paper's depth labels for Cityscapes and nuScenes). It is known up to scale and shift only, so each frame's map
   is min-max normalized to [0, 1] and binned into `depth_bins` linear bins (bin b: [b, b+1) / depth_bins, the
   top bin closed; a constant map is left out); the head predicts that normalized disparity, and its AbsRel /
   delta1 are in it.
   `--depth-labels` defaults to `--labels`.
Heads: DPTConfig.paper (in_dim 768, 256 features, out channels [128, 256, 512, 512]) or .tiny (preset), with
as many classes as the labels have (19 trainIds, the source's class list), and for depth `depth_bins`
log-spaced bins in [depth_min, depth_max] metres; depth is trained as a classification of the bin index
(cross-entropy, as the paper), pixels with no depth (the sky) ignored. Optimisation as appendix 9.3:
AdamW, lr 0.0016, weight decay 1e-4, batch 128, 100 epochs with a 10-epoch linear warm-up, then polynomial
decay (power 0.9) for segmentation and cosine annealing for depth. Labels are resized to the head's
output (patch grid x 14) by nearest neighbour. The labels, schedule and loop are inference/dpt_training.py.

Writes `seg.safetensors` / `depth.safetensors` (inference.dpt.save_head: `python -m jobs.evaluate
--seg-head ... --depth-head ...` reads them) and `summary.json` (loss per epoch, pixel mIoU /
depth AbsRel on the training frames, or on `--val-store`'s when given).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference import InferenceError
from inference.dpt_training import fit_head, load_frames, score, targets
from inference.labels import PSEUDO_DEPTH
from jobs.cli import run
from jobs.config import DEMO, DEMO_STORE, parse_config

log = logging.getLogger("re2pix.train_dpt")


@dataclass
class TrainDPTConfig:
    store: str = field(default=DEMO_STORE, metadata={"help": "store whose DINOv2 features the heads learn from"})
    val_store: str | None = field(default=None, metadata={"help": "store the heads are scored on (None: none)"})
    labels: str = field(
        default="source", metadata={"help": "source (read_targets), cityscapes (gtFine) or pseudo-depth (depth only)"}
    )
    depth_labels: str = field(
        default="",
        metadata={
            "help": "the depth head's labels: source, or pseudo-depth (the store's frames/pseudo_depth, cached with "
            "jobs.cache --pseudo-depth); empty: as --labels"
        },
    )
    tasks: str = field(default="segmentation,depth", metadata={"help": "segmentation, depth or both"})
    head: str = field(default="tiny", metadata={"help": "tiny or paper (inference.dpt.DPTConfig)"})
    annotated_frame: int = field(default=16, metadata={"help": "clip frame scored on the validation store"})
    epochs: int = field(default=100, metadata={"help": "passes over the labelled frames"})
    warmup_epochs: int = field(default=10, metadata={"help": "linear warmup epochs"})
    batch_size: int = field(default=128, metadata={"help": "frames per optimizer step"})
    lr: float = field(default=0.0016, metadata={"help": "peak learning rate (AdamW, cosine)"})
    weight_decay: float = field(default=0.0001, metadata={"help": "AdamW weight decay"})
    depth_bins: int = field(default=256, metadata={"help": "depth classification bins"})
    depth_min: float = field(default=1.0, metadata={"help": "depth of the first bin"})
    depth_max: float = field(default=150.0, metadata={"help": "depth of the last bin"})
    max_clips: int | None = field(default=None, metadata={"help": "train on the first N clips (None: all)"})
    seed: int = field(default=0, metadata={"help": "seed of initialization and data order"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    out: str = field(default=f"{DEMO}/heads", metadata={"help": "folder of the heads (safetensors) and their scores"})


def head_config(cfg: TrainDPTConfig, task: str, feature_dim: int, num_classes: int):
    from inference.dpt import DPTConfig

    make = DPTConfig.paper if cfg.head == "paper" else DPTConfig.tiny
    extra = {"in_dim": feature_dim // 4, "num_classes": num_classes if task == "segmentation" else cfg.depth_bins}
    if task == "depth" and depth_source(cfg) == PSEUDO_DEPTH:  # per-frame normalized disparity in [0, 1]
        extra.update(depth_min=0.0, depth_max=1.0, depth_spacing="linear")
    elif task == "depth":
        extra.update(depth_min=cfg.depth_min, depth_max=cfg.depth_max, depth_spacing="log")
    return make(task, **extra)


def depth_source(cfg: TrainDPTConfig) -> str:
    return cfg.depth_labels or cfg.labels


def run_train_dpt(cfg: TrainDPTConfig) -> dict:
    from inference.dpt import DPTHead, save_head
    from pipeline.store.reader import Store

    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"segmentation", "depth"}:
        raise InferenceError(f"--tasks must name segmentation and/or depth, got {cfg.tasks!r}")
    if "depth" in tasks and depth_source(cfg) not in ("source", PSEUDO_DEPTH):
        raise InferenceError(f"{depth_source(cfg)} labels have no depth: --tasks segmentation, or --depth-labels")
    if "segmentation" in tasks and cfg.labels == PSEUDO_DEPTH:
        raise InferenceError("pseudo-depth labels have no classes: --tasks depth, or --labels source / cityscapes")
    store = Store(cfg.store)
    val_store = Store(cfg.val_store) if cfg.val_store else None
    kinds = {"segmentation": cfg.labels, "depth": depth_source(cfg)}
    loaded = {}  # labels kind -> (train frames, val frames or None): one read per kind for both heads
    for kind in dict.fromkeys(kinds[t] for t in tasks):
        loaded[kind] = (
            load_frames(store, kind, cfg.annotated_frame, cfg.max_clips),
            load_frames(val_store, kind, cfg.annotated_frame, cfg.max_clips) if val_store else None,
        )
        log.info(
            "%s labels: %d frames of %s%s",
            kind,
            len(loaded[kind][0][0]),
            cfg.store,
            f", {len(loaded[kind][1][0])} of {cfg.val_store}" if val_store else "",
        )
    names = loaded[cfg.labels][0][2] if cfg.labels in loaded else []
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": asdict(cfg), "classes": names, "heads": {}}
    for task in tasks:
        (feats, labels, _), val = loaded[kinds[task]]
        torch.manual_seed(cfg.seed)
        hc = head_config(cfg, task, feats.shape[-1], len(names))
        head = DPTHead(hc).train()
        h, w = feats.shape[1:3]
        y = targets(labels, task, (h * hc.patch_size, w * hc.patch_size), hc)
        losses, total = fit_head(
            head,
            feats,
            y,
            task,
            epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
        )
        name = "seg" if task == "segmentation" else "depth"
        path = save_head(out / f"{name}.safetensors", head)
        scored = score(head, *(val[:2] if val else (feats, labels)), task)
        summary["heads"][name] = {
            "path": str(path),
            "labels": kinds[task],
            "frames": len(feats),
            "loss_per_epoch": losses,
            "steps": total,
            ("val" if val else "train_frames"): scored,
        }
        log.info("%s head: loss %.4f -> %.4f, %s", task, losses[0], losses[-1], scored)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(TrainDPTConfig, "train_dpt", argv, description=__doc__)
    s = run_train_dpt(cfg)
    for name, h in s["heads"].items():
        print(
            f"{name}: {h['path']} loss {h['loss_per_epoch'][0]:.4g} -> {h['loss_per_epoch'][-1]:.4g} "
            f"{h.get('val') or h.get('train_frames')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
