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
output (patch grid x 14) by nearest neighbour.

Writes `seg.safetensors` / `depth.safetensors` (inference.dpt.save_head: `python -m jobs.evaluate
--seg-head ... --depth-head ...` reads them) and `summary.json` (loss per epoch, pixel mIoU /
depth AbsRel on the training frames, or on `--val-store`'s when given).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference import InferenceError
from inference.labels import PSEUDO_DEPTH
from jobs.cli import run
from jobs.config import DEMO, DEMO_STORE, parse_config

log = logging.getLogger("re2pix.train_dpt")
IGNORE = 255


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


def frame_labels(store, labels: str, annotated_frame: int):
    """[(clip row, feature index, {"seg": uint8 [H, W] or None, "depth": float32 [H, W] or None})], class names."""
    from inference.labels import Labels, normalized_disparity
    from pipeline.sources.reopen import reopen_source

    g = store.geometry
    out = []
    if labels == "source":
        source, why = reopen_source(store.manifest)
        if source is None:
            raise InferenceError(f"{store.location}: cannot read the labels from its source: {why}")
        names = (source.target_classes() or {}).get("names")
        if not names:
            dataset = store.manifest.get("dataset")
            raise InferenceError(f"{store.location}: its source ({dataset}) renders no ground truth")
        for i in range(len(store)):
            meta = store.clip_meta(i)
            refs = {f.index: f for f in source.frames(meta["scene"])}
            for k in range(g.context_latents + g.future_latents):
                t = source.read_targets(meta["scene"], refs[meta["start"] + k * g.temporal_downsample])
                out.append((i, k, {"seg": t["classes"], "depth": t["depth"]}))
        return out, list(names)
    if labels == "cityscapes":
        lab = Labels(store.manifest, annotated_frame)
        if not lab.has_seg or annotated_frame % g.temporal_downsample:
            raise InferenceError(f"{store.location}: no gtFine labels (or frame {annotated_frame} has no feature map)")
        for i in range(len(store)):
            meta = store.clip_meta(i)
            seg = lab.seg(meta["clip_id"], meta)
            if seg is not None:
                out.append((i, annotated_frame // g.temporal_downsample, {"seg": seg, "depth": None}))
        return out, [str(c) for c in range(19)]
    if labels == PSEUDO_DEPTH:
        if not store.has_pseudo_depth:
            raise InferenceError(
                f"{store.location} holds no pseudo-depth: cache it with `python -m jobs.cache --pseudo-depth "
                "depth-anything/Depth-Anything-V2-Small-hf ...`"
            )
        for i in range(len(store)):
            for k, d in enumerate(store.read_pseudo_depth(i)):
                if d.max() > d.min():  # a constant map has no depth order: no label at all
                    out.append((i, k, {"seg": None, "depth": normalized_disparity(d)}))
        return out, []
    raise InferenceError(f"--labels must be source, cityscapes or {PSEUDO_DEPTH}, got {labels!r}")


def load_frames(store, labels: str, annotated_frame: int, max_clips: int | None):
    """Un-projected features [N, h, w, D] float32, labels, class names."""
    rows, names = frame_labels(store, labels, annotated_frame)
    if max_clips is not None:
        rows = [r for r in rows if r[0] < max_clips]
    if not rows:
        raise InferenceError(f"{store.location}: no labelled frames")
    feats, cache = [], {}
    for i, k, _ in rows:
        if i not in cache:
            cache = {i: store.read_clip(i).features}
        feats.append(store.basis.unproject(cache[i][k].astype(np.float32)))
    return np.stack(feats).astype(np.float32), [r[2] for r in rows], names


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


def targets(labels: list[dict], task: str, size, head_cfg) -> torch.Tensor:
    """Class (or depth-bin) index maps [N, *size] int64 at the head's output resolution; ignored = 255."""
    maps = []
    for lab in labels:
        if task == "segmentation":
            m = torch.from_numpy(np.array(lab["seg"])).long()
        else:
            d = torch.from_numpy(np.array(lab["depth"], np.float32))
            lo, hi = head_cfg.depth_min, head_cfg.depth_max
            x = d.clamp(lo, hi)
            if head_cfg.depth_spacing == "log":
                x, lo, hi = x.log(), math.log(lo), math.log(hi)
            m = ((x - lo) / (hi - lo) * head_cfg.num_classes).long().clamp(0, head_cfg.num_classes - 1)
            m[~torch.isfinite(d)] = IGNORE
        maps.append(F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long())
    return torch.stack(maps)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    return (1 - p) ** 0.9 if kind == "poly" else 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def score(head, feats: np.ndarray, labels: list[dict], task: str) -> dict:
    from inference.dpt import depth_metrics, miou, segmentation_confusion, split_blocks

    head.eval()
    conf, sums = None, {}
    for j in range(len(feats)):
        lab = labels[j]["seg"] if task == "segmentation" else labels[j]["depth"]
        pred = head.predict(split_blocks(torch.from_numpy(feats[j : j + 1])), size=lab.shape[:2])[0]
        target = torch.from_numpy(np.array(lab))
        if task == "segmentation":
            c = segmentation_confusion(pred, target, head.cfg.num_classes)
            conf = c if conf is None else conf + c
        else:
            for k, v in depth_metrics(pred, target).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    head.train()
    if task == "segmentation":
        return {"miou": miou(conf)}
    return {"absrel": sums["absrel_sum"] / max(sums["count"], 1), "delta1": sums["delta1_sum"] / max(sums["count"], 1)}


def run_train_dpt(cfg: TrainDPTConfig) -> dict:
    from inference.dpt import DPTHead, save_head, split_blocks
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
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        per_epoch = math.ceil(len(feats) / cfg.batch_size)
        total, warmup = cfg.epochs * per_epoch, cfg.warmup_epochs * per_epoch
        kind = "poly" if task == "segmentation" else "cosine"
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, t=total, w=warmup, k=kind: lr_factor(s, t, w, k))
        g = torch.Generator().manual_seed(cfg.seed)
        losses = []
        for _ in range(cfg.epochs):
            order, epoch_loss = torch.randperm(len(feats), generator=g), []
            for s in range(0, len(feats), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                logits = head(split_blocks(torch.from_numpy(feats[idx.numpy()])))
                loss = F.cross_entropy(logits, y[idx], ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                epoch_loss.append(loss.item())
            losses.append(round(float(np.mean(epoch_loss)), 5))
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
