"""Measure Re2Pix and the Baseline on a store: `python -m jobs.evaluate --preset tiny --store runs/demo/val.zarr`.

For every clip (first variant; `--max-clips` for a subset) and each of `--samples` sampling runs (the
paper's appendix 6.1 reports mean ± std over 3): Stage 1 rolls out the future features (deterministic:
measured once), Re2Pix and the Baseline sample the future latents from the same per-clip noise (seeded
by --seed, the run and the clip, so batch size does not change results), and the VAE decodes
[z0..z3, ẑ4..ẑ6] into 25 frames.

Metrics (each model's value per run is a mean over clips; the JSON keeps every run):
- Stage 1: model/metrics.py's feature MSE / cosine per future frame and PCA channel prefix, plus the
  same for copying the last context frame (`copy_last/`).
- `latent_mse` (and per latent `t4`..`t6`): sampled vs stored future latents.
- `psnr`, `ssim` (and per frame `f13`..`f24`): decoded frames 13-24 against the REFERENCE, the VAE
  reconstruction of the stored ground-truth latents (a store holds latents, not pixels: scores against
  the original frames would add the VAE's own error to every model alike). SSIM as inference/video_metrics.py.
- `fid` (Inception-v3 pool features of all predicted frames vs the reference frames) and `fvd` (I3D
  features of the 12-frame predicted clips vs the reference clips) when --fid-weights / --fvd-weights
  give the networks (inference/video_metrics.py). `--fid` / `--fvd` without weights is an error.
- `seg/miou_all`, `seg/miou_moving` (trainIds 11-18) and `depth/absrel`, `depth/delta1` on the
  annotated frame (`--annotated-frame`, Cityscapes: clip frame 16 = predicted frame 3) with DPT heads
  (`--seg-head`, `--depth-head`, inference/dpt.py) on DINOv2 features of the decoded frame; for Stage 1 on
  its un-projected forecast features (when the frame has a feature map); for `reference` on the VAE
  reconstruction. Labels: `--labels DIR` ({clip_id}.png of trainIds, 255 ignored), `--depth-labels DIR`
  ({clip_id}.npy, in the depth head's units); Cityscapes stores find gtFine in their source root.
  Without labels the metric is skipped and the JSON says why.

JSON schema (`--out`, "re2pix-evaluation/1"):
  {"schema", "store", "dataset", "split", "clips", "clip_ids", "samples", "annotated_frame",
   "reference": {"pixels": "vae_reconstruction", "note"}, "sampler": {...}, "checkpoints": {...},
   "stage1": {metric: number},
   "models": {"re2pix": {metric: {"mean", "std", "runs": [one value per sampling run]}}, "baseline": ...},
   "reference_metrics": {metric: number}, "skipped": {metric: reason}, "seconds"}
std is the sample standard deviation across runs (ddof 1; 0 for one run); a value that is not finite
(e.g. PSNR of identical frames) is written as null.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from jobs.config import parse_config

log = logging.getLogger("re2pix.evaluate")
SCHEMA = "re2pix-evaluation/1"
REFERENCE_NOTE = ("PSNR, SSIM, FID and FVD compare the decoded predictions (frames 13-24) with the VAE "
                  "reconstruction of the stored ground-truth latents: the store holds latents, not pixels.")
# Cityscapes labelIds -> trainIds (cityscapesscripts' labels.py); everything else is 255 (ignored)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@dataclass
class EvaluateConfig:
    store: str = field(default="runs/demo/val.zarr", metadata={"help": "the store to evaluate on (its val split)"})
    stage1: str = "runs/demo/train/stage1"
    stage2: str = "runs/demo/train/stage2"
    baseline: str | None = field(default="runs/demo/train/baseline",
                                 metadata={"help": "Baseline run dir; skipped when it holds no checkpoint"})
    weights: str = field(default="auto", metadata={"help": "auto (EMA when saved), ema or model"})
    samples: int = field(default=3, metadata={"help": "sampling runs per clip (mean ± std across them)"})
    max_clips: int | None = None
    batch_size: int = field(default=4, metadata={"help": "clips per batch"})
    steps: int = 35
    solver: str = "heun"
    seed: int = 0
    guidance_channels: int | None = None
    guidance_weight: float = 0.0
    decode: bool = field(default=True, metadata={"help": "--no-decode: feature and latent metrics only"})
    ssim_channels: str = field(default="rgb", metadata={"help": "rgb (mean of channels) or luma"})
    fid: bool = field(default=False, metadata={"help": "require FID (on by itself when --fid-weights is given)"})
    fid_weights: str | None = field(default=None, metadata={"help": "pytorch-fid Inception .pth or TorchScript"})
    fvd: bool = field(default=False, metadata={"help": "require FVD (on by itself when --fvd-weights is given)"})
    fvd_weights: str | None = field(default=None, metadata={"help": "I3D TorchScript (i3d_torchscript.pt)"})
    seg_head: str | None = field(default=None, metadata={"help": "DPT segmentation head (safetensors)"})
    depth_head: str | None = field(default=None, metadata={"help": "DPT depth head (safetensors)"})
    labels: str | None = field(default=None, metadata={"help": "folder of {clip_id}.png trainId maps"})
    depth_labels: str | None = field(default=None, metadata={"help": "folder of {clip_id}.npy depth maps"})
    annotated_frame: int = field(default=16, metadata={"help": "clip frame the labels annotate"})
    dinov2: str | None = None
    vae: str | None = None
    allow_download: bool = False
    allow_weights_mismatch: bool = False
    out: str | None = field(default="runs/demo/eval/results.json", metadata={"help": "JSON results path"})
    device: str = "auto"
    threads: int = 0
    progress: bool = True


# --------------------------------------------------------------------------- labels


class Labels:
    """Segmentation (trainIds) and depth labels of a clip's annotated frame, or None."""

    def __init__(self, cfg: EvaluateConfig, manifest: dict):
        self.seg_dir = Path(cfg.labels) if cfg.labels else None
        self.depth_dir = Path(cfg.depth_labels) if cfg.depth_labels else None
        self.cityscapes = None
        if manifest.get("dataset") == "cityscapes" and not self.seg_dir and manifest.get("source_root"):
            root = Path(manifest["source_root"]) / "gtFine" / str(manifest.get("split", "val"))
            self.cityscapes = root if root.is_dir() else None
        self.annotated = cfg.annotated_frame

    @property
    def has_seg(self) -> bool:
        return self.seg_dir is not None or self.cityscapes is not None

    @property
    def has_depth(self) -> bool:
        return self.depth_dir is not None

    def seg(self, clip_id: str, meta: dict) -> np.ndarray | None:
        from PIL import Image
        if self.seg_dir is not None:
            path = self.seg_dir / f"{clip_id}.png"
            return np.asarray(Image.open(path)) if path.exists() else None
        city, seq, first = meta["scene"].rsplit("_", 2)  # Cityscapes scenes: {city}_{seq}_{first frame}
        number = int(first) + int(meta["start"]) + self.annotated
        stem = self.cityscapes / city / f"{city}_{seq}_{number:06d}_gtFine_"
        if Path(f"{stem}labelTrainIds.png").exists():
            return np.asarray(Image.open(f"{stem}labelTrainIds.png"))
        if Path(f"{stem}labelIds.png").exists():
            ids = np.asarray(Image.open(f"{stem}labelIds.png"))
            table = np.full(256, 255, np.uint8)
            for k, v in CITYSCAPES_TRAIN_IDS.items():
                table[k] = v
            return table[ids]
        return None

    def depth(self, clip_id: str) -> np.ndarray | None:
        path = self.depth_dir / f"{clip_id}.npy" if self.depth_dir else None
        return np.load(path).astype(np.float32) if path is not None and path.exists() else None


# --------------------------------------------------------------------------- accumulators


class Acc:
    """Sums of one model in one sampling run."""

    def __init__(self):
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        self.confusion = None
        self.depth = defaultdict(float)
        self.fid, self.fvd = [], []

    def add(self, key: str, values) -> None:
        v = torch.as_tensor(values).double().reshape(-1)
        self.sums[key] += float(v.sum())
        self.counts[key] += v.numel()

    def add_confusion(self, c: torch.Tensor) -> None:
        self.confusion = c if self.confusion is None else self.confusion + c

    def values(self, fid_ref=None, fvd_ref=None) -> dict[str, float]:
        from inference.dpt import MOVING_CLASSES, miou
        from inference.video_metrics import frechet_distance, gaussian_stats
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        if self.confusion is not None:
            out["seg/miou_all"] = miou(self.confusion)
            out["seg/miou_moving"] = miou(self.confusion, MOVING_CLASSES)
        if self.depth.get("count"):
            out["depth/absrel"] = self.depth["absrel_sum"] / self.depth["count"]
            out["depth/delta1"] = self.depth["delta1_sum"] / self.depth["count"]
        if self.fid and fid_ref is not None:
            out["fid"] = frechet_distance(*fid_ref, *gaussian_stats(torch.cat(self.fid)))
        if self.fvd and fvd_ref is not None:
            out["fvd"] = frechet_distance(*fvd_ref, *gaussian_stats(torch.cat(self.fvd)))
        return out


def summarize(runs: list[float]) -> dict:
    a = np.asarray(runs, np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": _finite(a.mean()), "std": _finite(std), "runs": [_finite(v) for v in a]}


def _finite(v):
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- evaluation


class Semantic:
    """DPT heads on DINOv2 features of frames, or on un-projected PCA features."""

    def __init__(self, cfg: EvaluateConfig, labels: Labels, space, device, skipped: dict):
        from inference.dpt import load_head
        self.heads, self.labels, self.space = {}, labels, space
        self.missing: dict[str, set] = defaultdict(set)  # clip ids without a label, per head
        self.frame = cfg.annotated_frame
        g = space.geometry
        if not 0 <= self.frame < g.clip_frames:
            raise SystemExit(f"--annotated-frame {self.frame} is not a frame of a {g.clip_frames}-frame clip")
        for task, path, has, flag in (("segmentation", cfg.seg_head, labels.has_seg, "--labels"),
                                      ("depth", cfg.depth_head, labels.has_depth, "--depth-labels")):
            key = "seg" if task == "segmentation" else "depth"
            if not path:
                skipped[key] = f"no --{key}-head given"
            elif not has:
                skipped[key] = (f"no {task} labels: the store ({space.manifest.get('dataset')}) offers none; "
                                f"give {flag} DIR")
            else:
                head = load_head(path, device, task=task)
                if head.cfg.in_dim * 4 != g.feature_dim:
                    raise SystemExit(f"{path} takes 4 x {head.cfg.in_dim}-d blocks; the features are {g.feature_dim}-d")
                self.heads[key] = head
        self.dino = None
        if self.heads and cfg.decode:
            from inference.encoders import load_dinov2_for
            self.dino = load_dinov2_for(cfg.dinov2, space.manifest, g, device, cfg.allow_download,
                                        cfg.allow_weights_mismatch)

    @property
    def active(self) -> bool:
        return bool(self.heads)

    def frames_features(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> DINOv2 features [B, h, w, D] (resized as the cache job does)."""
        from pipeline.frames import resize_frames
        return self.dino(resize_frames(frames, self.space.geometry.dino_input_hw)).float()

    def pca_features(self, pca: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.space.basis.unproject(pca.float().cpu().numpy()))

    @torch.no_grad()
    def score(self, acc: Acc, features: torch.Tensor, clip_ids: list[str], metas: list[dict]) -> None:
        """features [B, h, w, D] of the annotated frame of each clip."""
        from inference.dpt import depth_metrics, segmentation_confusion, split_blocks
        for key, head in self.heads.items():
            dev = next(head.parameters()).device
            for b, (clip_id, meta) in enumerate(zip(clip_ids, metas)):
                label = self.labels.seg(clip_id, meta) if key == "seg" else self.labels.depth(clip_id)
                if label is None:
                    self.missing[key].add(clip_id)
                    continue
                blocks = split_blocks(features[b: b + 1].to(dev))
                pred = head.predict(blocks, size=label.shape[:2])[0]
                target = torch.from_numpy(np.array(label))
                if key == "seg":
                    acc.add_confusion(segmentation_confusion(pred.cpu(), target, head.cfg.num_classes))
                else:
                    for k, v in depth_metrics(pred.cpu(), target).items():
                        acc.depth[k] += float(v)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    from inference.codec import LatentCodec
    from inference.encoders import load_vae_for
    from inference.inputs import DataSpace
    from inference.sampling import Sampler, clip_noise, forecast_features, sample_models, stage2_features
    from inference.stages import Models, resolve_device
    from inference.video_metrics import gaussian_stats, load_fid_network, load_fvd_network, psnr, ssim
    from model.metrics import Means, feature_metrics
    from pipeline.store.reader import Store

    t0 = time.time()
    want_fid, want_fvd = cfg.fid or bool(cfg.fid_weights), cfg.fvd or bool(cfg.fvd_weights)
    if want_fid and not cfg.fid_weights:
        raise SystemExit("FID needs the Inception-v3 weights: give --fid-weights PATH (pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth, or a TorchScript Inception); nothing is downloaded")
    if want_fvd and not cfg.fvd_weights:
        raise SystemExit("FVD needs the I3D network: give --fvd-weights PATH (a TorchScript I3D such as "
                         "StyleGAN-V's i3d_torchscript.pt); nothing is downloaded")
    if (want_fid or want_fvd) and not cfg.decode:
        raise SystemExit("FID and FVD need decoded frames: drop --no-decode")
    if cfg.samples < 1:
        raise SystemExit("--samples must be at least 1")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    store = Store(cfg.store)
    g = store.geometry
    space = DataSpace.of_store(store)
    if store.manifest.get("split") not in ("val", "test"):
        log.warning("%s holds the %r split, not a validation split", cfg.store, store.manifest.get("split"))
    models = Models.load(cfg.stage1, cfg.stage2, cfg.baseline, cfg.weights, device)
    models.check(g, store.num_channels)
    names = ["re2pix"] + (["baseline"] if models.baseline else [])
    skipped: dict[str, str] = {}
    if not models.baseline:
        skipped["baseline"] = f"no Baseline checkpoint at {cfg.baseline}"
    if not cfg.decode:
        skipped["pixels"] = "--no-decode: PSNR, SSIM, FID, FVD and the decoded frames' segmentation/depth"
    if not want_fid:
        skipped["fid"] = "no --fid-weights given"
    if not want_fvd:
        skipped["fvd"] = "no --fvd-weights given"
    fid_net = load_fid_network(cfg.fid_weights, device) if want_fid else None
    fvd_net = load_fvd_network(cfg.fvd_weights, device) if want_fvd else None
    codec = LatentCodec(load_vae_for(cfg.vae, store.manifest, g, device, cfg.allow_download,
                                     cfg.allow_weights_mismatch), space.latent_norm) if cfg.decode else None
    semantic = Semantic(cfg, Labels(cfg, store.manifest), space, device, skipped)
    sampler = Sampler(cfg.steps, cfg.solver, cfg.guidance_channels, cfg.guidance_weight)

    n = len(store) if cfg.max_clips is None else min(len(store), cfg.max_clips)
    if n == 0:
        raise SystemExit(f"{cfg.store} has no clips")
    m, fut, ctx_frames, a = g.context_latents, g.future_latents, g.context_frames, cfg.annotated_frame
    c_read = max(models.stage1.model.config.num_pca_channels, models.stage2.model.cfg.feature_channels)
    accs = {name: [Acc() for _ in range(cfg.samples)] for name in names}
    stage1_means, stage1_acc, ref_acc = Means(), Acc(), Acc()
    ref_fid, ref_fvd = [], []
    clip_ids = []
    from tqdm.auto import tqdm
    bar = tqdm(total=n * cfg.samples, desc="evaluate", unit="clip-run", disable=not cfg.progress)
    for start in range(0, n, cfg.batch_size):
        idx = list(range(start, min(n, start + cfg.batch_size)))
        clips = [store.read_clip(i, channels=c_read) for i in idx]
        ids = [c.clip_id for c in clips]
        metas = [store.clip_meta(i) for i in idx]
        clip_ids += ids
        feats = torch.from_numpy(np.stack([c.features for c in clips])).float().to(device)  # [B, 7, H, W, c]
        latents = torch.from_numpy(np.stack([c.latents for c in clips])).float().to(device)  # [B, 16, 7, h, w]
        forecast = forecast_features(models, feats[:, :m], fut)  # [B, 3, H, W, c1]
        c1 = forecast.shape[-1]
        stage1_means.update(feature_metrics(forecast, feats[:, m:, ..., :c1], first_frame=m))
        copy = feats[:, m - 1: m, ..., :c1].expand_as(forecast)
        stage1_means.update({k: v for k, v in feature_metrics(copy, feats[:, m:, ..., :c1], m).items() if "@" not in k},
                            prefix="copy_last/")
        if semantic.active and a % g.temporal_downsample == 0 and a // g.temporal_downsample >= m:
            semantic.score(stage1_acc, semantic.pca_features(forecast[:, a // g.temporal_downsample - m]), ids, metas)
        conditioning = stage2_features(feats[:, :m], forecast, models.stage2.model.cfg.feature_channels)
        reference = None
        if cfg.decode:
            reference = codec.decode(latents)  # [B, 25, H, W, 3]: the VAE reconstruction
            future_ref = reference[:, ctx_frames:]
            if fid_net:
                ref_fid.append(fid_net(future_ref.reshape(-1, *future_ref.shape[2:])))
            if fvd_net:
                ref_fvd.append(fvd_net(future_ref))
            if semantic.dino is not None:
                semantic.score(ref_acc, semantic.frames_features(reference[:, a]), ids, metas)
        for run in range(cfg.samples):
            noise = clip_noise(cfg.seed, run, idx, (latents.shape[1], fut, *latents.shape[3:])).to(device)
            with torch.no_grad():
                sampled = sample_models(models, sampler, latents[:, :, :m], conditioning, noise)
            for name in names:
                acc, z = accs[name][run], sampled[name]
                err = (z[:, :, m:] - latents[:, :, m:]).pow(2)  # [B, 16, 3, h, w]
                acc.add("latent_mse", err.mean(dim=(1, 2, 3, 4)))
                for t in range(fut):
                    acc.add(f"latent_mse/t{m + t}", err[:, :, t].mean(dim=(1, 2, 3)))
                if not cfg.decode:
                    continue
                frames = codec.decode(z)  # [B, 25, H, W, 3]
                pred = frames[:, ctx_frames:]
                p, s = psnr(pred, future_ref), ssim(pred, future_ref, cfg.ssim_channels)  # [B, 12]
                acc.add("psnr", p.mean(dim=1))
                acc.add("ssim", s.mean(dim=1))
                for k in range(pred.shape[1]):
                    acc.add(f"psnr/f{ctx_frames + k}", p[:, k])
                    acc.add(f"ssim/f{ctx_frames + k}", s[:, k])
                if fid_net:
                    acc.fid.append(fid_net(pred.reshape(-1, *pred.shape[2:])))
                if fvd_net:
                    acc.fvd.append(fvd_net(pred))
                if semantic.dino is not None:
                    semantic.score(acc, semantic.frames_features(frames[:, a]), ids, metas)
            bar.update(len(idx))
    bar.close()

    fid_ref = gaussian_stats(torch.cat(ref_fid)) if ref_fid else None
    fvd_ref = gaussian_stats(torch.cat(ref_fvd)) if ref_fvd else None
    results = {"schema": SCHEMA, "store": cfg.store, "dataset": store.manifest.get("dataset"),
               "split": store.manifest.get("split"), "clips": n, "clip_ids": clip_ids, "samples": cfg.samples,
               "annotated_frame": a,
               "reference": {"pixels": "vae_reconstruction" if cfg.decode else None, "note": REFERENCE_NOTE},
               "sampler": {**asdict(sampler), "seed": cfg.seed}, "checkpoints": models.describe(),
               "stage1": {**stage1_means.compute(), **stage1_acc.values()},
               "models": {}, "reference_metrics": ref_acc.values(), "skipped": skipped}
    for name in names:
        per_run = [acc.values(fid_ref, fvd_ref) for acc in accs[name]]
        keys = sorted({k for r in per_run for k in r})
        results["models"][name] = {k: summarize([r.get(k, float("nan")) for r in per_run]) for k in keys}
    for key, ids in semantic.missing.items():
        skipped[f"{key}_labels"] = f"{len(ids)} of {n} clips have no label, left out: {sorted(ids)[:5]}"
    results["stage1"] = {k: _finite(v) for k, v in results["stage1"].items()}
    results["reference_metrics"] = {k: _finite(v) for k, v in results["reference_metrics"].items()}
    results["seconds"] = round(time.time() - t0, 1)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(results, indent=1, allow_nan=False))
    return results


# --------------------------------------------------------------------------- the table


def _row_keys(metrics: dict) -> list[str]:
    order = ["latent_mse", "psnr", "ssim", "fid", "fvd", "seg/miou_all", "seg/miou_moving", "depth/absrel",
             "depth/delta1"]
    return [k for k in order if k in metrics]


def format_table(results: dict, per_frame: bool = False) -> str:
    names = list(results["models"])
    first = results["models"][names[0]]
    keys = _row_keys(first) + ([k for k in first if re.match(r"(psnr|ssim)/f\d+$", k)] if per_frame else [])
    lines = [(f"{results['clips']} clips x {results['samples']} samples of {results['store']} "
              f"(mean ± std over sampling runs; pixels vs {results['reference']['pixels']})"),
             f"{'metric':18s}" + "".join(f"{n:>24s}" for n in names)]
    for k in keys:
        cells = []
        for n in names:
            v = results["models"][n].get(k)
            cells.append("-" if v is None or v["mean"] is None else f"{v['mean']:.4g} ± {v['std']:.2g}")
        lines.append(f"{k:18s}" + "".join(f"{c:>24s}" for c in cells))
    s1 = results["stage1"]
    lines.append("stage 1 features:  " + "  ".join(
        f"{k} {s1[k]:.4g}" for k in ("mse", "cos", "copy_last/mse", "copy_last/cos", "seg/miou_all",
                                      "depth/absrel") if s1.get(k) is not None))
    for k, why in results["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(EvaluateConfig, "evaluate", argv, description=__doc__)
    from pipeline.encoders import EncoderWeightsError
    from pipeline.store.format import StoreError
    try:
        results = run_evaluate(cfg)
    except (StoreError, EncoderWeightsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if cfg.out:
        print(f"wrote {cfg.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
