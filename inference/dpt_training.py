"""Training the DPT segmentation and depth heads (inference/dpt.py) on a store's cached features: the labels
of each feature frame, the un-projected features, target maps, the schedule and loop of paper appendix 9.3,
and the score. `python -m jobs.train_dpt` (its docstring says which labels and heads) is the job.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from inference import InferenceError
from inference.labels import PSEUDO_DEPTH

IGNORE = 255


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


def fit_head(
    head,
    feats: np.ndarray,
    y: torch.Tensor,
    task: str,
    *,
    epochs: int,
    warmup_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> tuple[list[float], int]:
    """Train `head` in place on un-projected features [N, h, w, D] and target maps `y` (targets()) as appendix
    9.3: AdamW, a linear warm-up of `warmup_epochs`, then polynomial decay (power 0.9) for segmentation and
    cosine annealing for depth; cross-entropy with IGNORE pixels left out. Returns the mean loss of each
    epoch and the optimizer steps taken."""
    from inference.dpt import split_blocks

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(feats) / batch_size)
    total, warmup = epochs * per_epoch, warmup_epochs * per_epoch
    kind = "poly" if task == "segmentation" else "cosine"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, t=total, w=warmup, k=kind: lr_factor(s, t, w, k))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order, epoch_loss = torch.randperm(len(feats), generator=g), []
        for s in range(0, len(feats), batch_size):
            idx = order[s : s + batch_size]
            logits = head(split_blocks(torch.from_numpy(feats[idx.numpy()])))
            loss = F.cross_entropy(logits, y[idx], ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
        losses.append(round(float(np.mean(epoch_loss)), 5))
    return losses, total
