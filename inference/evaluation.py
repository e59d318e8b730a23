"""Evaluating Re2Pix and the Baseline on the clips of a store (what jobs/evaluate.py runs; its docstring
names every metric and the JSON schema).

For each batch of clips: Stage 1 rolls out the future features once (it is deterministic), then each
of `samples` sampling runs draws Re2Pix and the Baseline from the same per-clip noise and the VAE
decodes them. Copying the last context latent into every future latent is scored beside them as a
model, `copy_last` (the bar a forecaster must clear; deterministic, so one run). Decoded frames are
scored against two references: the VAE reconstruction of the stored latents (`psnr`, `ssim`, `fid`,
`fvd`: what a latent-space model can reach, the same VAE error on both sides), and the source's real
frames resized as the cache job resized them (`psnr_vs_frames`, ...) whenever the store's source is
readable here; the reconstruction itself is scored against the frames too (`reference_metrics`: the
VAE's ceiling).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from . import InferenceError
from .sampling import Sampler, clip_noise, forecast_features, sample_models, stage2_features
from .semantic import Semantic
from .stages import Models

COPY_LAST = "copy_last"
# what Re2Pix reads for the future frames: Stage 1's rollout, or the store's own features (a perfect forecaster)
FEATURES = ("forecast", "truth")
VS_FRAMES = "_vs_frames"  # the key suffix of a metric against the source's frames (bare keys: the reconstruction)


class Acc:
    """Sums of one model in one sampling run."""

    def __init__(self, moving=None):
        self.moving = moving  # the class ids of the "moving" mIoU (None: Cityscapes' trainIds 11-18)
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

    def values(self, refs: dict | None = None) -> dict[str, float]:
        """The run's metrics; `refs` {key suffix: (FID reference stats, FVD reference stats)}, "" being the
        VAE reconstruction and VS_FRAMES the source's frames."""
        from .dpt import MOVING_CLASSES, miou
        from .video_metrics import frechet_distance, gaussian_stats

        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        if self.confusion is not None:
            out["seg/miou_all"] = miou(self.confusion)
            out["seg/miou_moving"] = miou(self.confusion, self.moving or MOVING_CLASSES)
        if self.depth.get("count"):
            out["depth/absrel"] = self.depth["absrel_sum"] / self.depth["count"]
            out["depth/delta1"] = self.depth["delta1_sum"] / self.depth["count"]
        for suffix, (fid_ref, fvd_ref) in (refs or {}).items():
            if self.fid and fid_ref is not None:
                out["fid" + suffix] = frechet_distance(*fid_ref, *gaussian_stats(torch.cat(self.fid)))
            if self.fvd and fvd_ref is not None:
                out["fvd" + suffix] = frechet_distance(*fvd_ref, *gaussian_stats(torch.cat(self.fvd)))
        return out

    def add_pixels(self, pred, target, first_frame: int, suffix: str, ssim_channels: str) -> None:
        """PSNR / SSIM of decoded frames [B, 12, H, W, 3] against `target` (same shape): clip means and per
        frame (`psnr{suffix}/f13`...)."""
        from .video_metrics import psnr, ssim

        p, s = psnr(pred, target), ssim(pred, target, ssim_channels)  # [B, 12]
        self.add("psnr" + suffix, p.mean(dim=1))
        self.add("ssim" + suffix, s.mean(dim=1))
        for k in range(p.shape[1]):
            self.add(f"psnr{suffix}/f{first_frame + k}", p[:, k])
            self.add(f"ssim{suffix}/f{first_frame + k}", s[:, k])


def summarize(runs: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one run) across sampling runs, and every run."""
    a = np.asarray(runs, np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": finite(a.mean()), "std": finite(std), "runs": [finite(v) for v in a]}


def finite(v):
    """A JSON number: a value that is not finite (PSNR of identical frames) becomes None."""
    v = float(v)
    return v if math.isfinite(v) else None


def evaluate_store(
    store,
    models: Models,
    sampler: Sampler,
    codec,
    semantic: Semantic,
    *,
    clips: int | list[int],
    samples: int,
    seed: int,
    batch_size: int,
    device,
    features: str = "forecast",
    decode_cache=None,
    fid_net=None,
    fvd_net=None,
    ssim_channels: str = "rgb",
    progress: bool = True,
) -> dict:
    """The metrics of the first `clips` clips (or of these clip indices): {"clip_ids", "stage1",
    "models": {name: {metric: summary}},
    "reference_metrics", "missing_labels": {head: clip ids}, "frames_reference": {"pixels", "why"} or None}.
    `codec` None: no decoding (feature and latent metrics only). `features` "truth": Re2Pix reads the store's
    future features instead of the forecast (the Stage 1 metrics still score the forecast). `decode_cache`
    (inference.decode_cache.DecodeCache): the reconstruction and copy-last decodes kept between evaluations."""
    from tqdm.auto import tqdm

    from model.metrics import Means, feature_metrics

    from .video_metrics import gaussian_stats

    g = store.geometry
    m, fut, ctx_frames, a = g.context_latents, g.future_latents, g.context_frames, semantic.frame
    names = ["re2pix"] + (["baseline"] if models.baseline else [])
    c_read = max(models.stage1.model.config.num_pca_channels, models.stage2.model.cfg.num_pca_channels)
    moving = semantic.labels.moving
    accs = {name: [Acc(moving) for _ in range(samples)] for name in names}
    accs[COPY_LAST] = [Acc(moving)]  # deterministic: one run
    stage1_means, stage1_acc, copy_acc, ref_acc = Means(), Acc(moving), Acc(moving), Acc(moving)
    ref_fid, ref_fvd, clip_ids = [], [], []
    real_fid, real_fvd, real_missing = [], [], {}  # FID / FVD references from the source's own frames
    indices = list(range(clips)) if isinstance(clips, int) else [int(i) for i in clips]
    bar = tqdm(total=len(indices) * samples, desc="evaluate", unit="clip-run", disable=not progress)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        doing = f"clips {start + 1}-{start + len(idx)} of {len(indices)}"
        bar.set_postfix_str(f"{doing}: reading, Stage 1 forecast")
        arrays = [store.read_clip(i, channels=c_read) for i in idx]
        ids = [c.clip_id for c in arrays]
        metas = [store.clip_meta(i) for i in idx]
        clip_ids += ids
        feats = torch.from_numpy(np.stack([c.features for c in arrays])).float().to(device)  # [B, 7, H, W, c]
        latents = torch.from_numpy(np.stack([c.latents for c in arrays])).float().to(device)  # [B, 16, 7, h, w]
        forecast = forecast_features(models, feats[:, :m], fut)  # [B, 3, H, W, c1]
        c1 = forecast.shape[-1]
        stage1_means.update(feature_metrics(forecast, feats[:, m:, ..., :c1], first_frame=m))
        copy = feats[:, m - 1 : m, ..., :c1].expand_as(forecast)
        stage1_means.update(
            {k: v for k, v in feature_metrics(copy, feats[:, m:, ..., :c1], m).items() if "@" not in k},
            prefix="copy_last/",
        )
        if semantic.active and a % g.temporal_downsample == 0 and a // g.temporal_downsample >= m:
            semantic.score(stage1_acc, semantic.pca_features(forecast[:, a // g.temporal_downsample - m]), ids, metas)
            semantic.score(copy_acc, semantic.pca_features(copy[:, 0]), ids, metas)
        future = forecast if features == "forecast" else feats[:, m:]  # "truth": the upper bound
        conditioning = stage2_features(feats[:, :m], future, models.stage2.model.cfg.num_pca_channels)
        if codec is not None:
            bar.set_postfix_str(f"{doing}: VAE reconstruction of the stored latents")
            decode = codec.decode_after(latents[:, :, :m])  # the context decoded once for every future of the batch
            # what does not change between evaluations of the store (the reconstruction, copy-last): kept on disk
            fixed = decode_cache.decode if decode_cache is not None else (lambda z, d=decode: d(z[:, :, m:]))
            reference = fixed(latents)  # [B, 25, H, W, 3]: the VAE reconstruction
            future_ref = reference[:, ctx_frames:]
            real_future = None if real_missing else _source_futures(store.manifest, metas, g, real_missing)
            if real_future is not None:  # the VAE's ceiling: the reconstruction against the frames
                ref_acc.add_pixels(future_ref, real_future, ctx_frames, VS_FRAMES, ssim_channels)
            if fid_net:
                ref_fid.append(fid_net(future_ref.reshape(-1, *future_ref.shape[2:])))
                ref_acc.fid.append(ref_fid[-1])
                if real_future is not None:
                    real_fid.append(fid_net(real_future.reshape(-1, *real_future.shape[2:])))
            if fvd_net:
                ref_fvd.append(fvd_net(future_ref))
                ref_acc.fvd.append(ref_fvd[-1])
                if real_future is not None:
                    real_fvd.append(fvd_net(real_future))
            if semantic.dino is not None:
                semantic.score(ref_acc, semantic.frames_features(reference[:, a]), ids, metas)
        for run in range(samples):
            sampling = f"sampling {' and '.join(names)} ({sampler.steps} steps)"
            bar.set_postfix_str(f"{doing}, run {run + 1}/{samples}: {sampling}")
            noise = clip_noise(seed, run, idx, (latents.shape[1], fut, *latents.shape[3:])).to(device)
            with torch.no_grad():
                sampled = sample_models(models, sampler, latents[:, :, :m], conditioning, noise)
            if run == 0:
                sampled[COPY_LAST] = torch.cat([latents[:, :, :m], latents[:, :, m - 1 : m].expand_as(noise)], dim=2)
            for name, z in sampled.items():
                acc = accs[name][run]
                err = (z[:, :, m:] - latents[:, :, m:]).pow(2)  # [B, 16, 3, h, w]
                acc.add("latent_mse", err.mean(dim=(1, 2, 3, 4)))
                for t in range(fut):
                    acc.add(f"latent_mse/t{m + t}", err[:, :, t].mean(dim=(1, 2, 3)))
                if codec is None:
                    continue
                bar.set_postfix_str(f"{doing}, run {run + 1}/{samples}: decoding {name}")
                frames = fixed(z) if name == COPY_LAST else decode(z[:, :, m:])  # [B, 25, H, W, 3]
                pred = frames[:, ctx_frames:]
                acc.add_pixels(pred, future_ref, ctx_frames, "", ssim_channels)
                if real_future is not None:
                    acc.add_pixels(pred, real_future, ctx_frames, VS_FRAMES, ssim_channels)
                if fid_net:
                    acc.fid.append(fid_net(pred.reshape(-1, *pred.shape[2:])))
                if fvd_net:
                    acc.fvd.append(fvd_net(pred))
                if semantic.dino is not None:
                    semantic.score(acc, semantic.frames_features(frames[:, a]), ids, metas)
            bar.update(len(idx))
    bar.close()

    # the frame-referenced scores only when every clip's frames could be read (a source that fails part-way
    # leaves none: a mean over some clips would not compare with the reconstruction-referenced one)
    readable = codec is not None and not real_missing
    refs = {
        "": tuple(gaussian_stats(torch.cat(f)) if f else None for f in (ref_fid, ref_fvd)),
        VS_FRAMES: tuple(gaussian_stats(torch.cat(f)) if f and readable else None for f in (real_fid, real_fvd)),
    }
    per_model = {}
    for name in [*names, COPY_LAST]:
        per_run = [acc.values(refs) for acc in accs[name]]
        keys = sorted({k for r in per_run for k in r if readable or VS_FRAMES not in k})
        per_model[name] = {k: summarize([r.get(k, float("nan")) for r in per_run]) for k in keys}
    reference_metrics = {  # the reconstruction against itself is perfect: only its scores against the frames
        k: finite(v) for k, v in ref_acc.values({VS_FRAMES: refs[VS_FRAMES]}).items() if readable or VS_FRAMES not in k
    }
    return {
        "clip_ids": clip_ids,
        "stage1": {
            k: finite(v)
            for k, v in {
                **stage1_means.compute(),
                **stage1_acc.values(),
                **{f"copy_last/{k}": v for k, v in copy_acc.values().items()},
            }.items()
        },
        "models": per_model,
        "reference_metrics": reference_metrics,
        "missing_labels": {key: sorted(ids) for key, ids in semantic.missing.items()},
        "frames_reference": (
            None
            if codec is None
            else {"pixels": "source_frames"}
            if readable
            else {"pixels": None, "why": real_missing.get("reason")}
        ),
    }


def _source_futures(manifest: dict, metas: list[dict], geometry, missing: dict):
    """The clips' real future frames uint8 [B, 12, H, W, 3] from the store's source, or None (and `missing`
    says why) when a clip's frames cannot be read."""
    from .inputs import source_clip_frames

    out = []
    for meta in metas:
        frames, info = source_clip_frames(manifest, meta, geometry)
        if frames is None:
            missing["reason"] = f"{meta.get('clip_id')}: {info.get('reason')}"
            return None
        out.append(frames[geometry.context_frames :])
    return torch.from_numpy(np.stack(out))


def _row_keys(metrics: dict) -> list[str]:
    order = [
        "latent_mse",
        "psnr",
        "ssim",
        "fid",
        "fvd",
        "psnr" + VS_FRAMES,
        "ssim" + VS_FRAMES,
        "fid" + VS_FRAMES,
        "fvd" + VS_FRAMES,
        "seg/miou_all",
        "seg/miou_moving",
        "depth/absrel",
        "depth/delta1",
    ]
    return [k for k in order if k in metrics]


def _cell(v: dict | None) -> str:
    """mean ± std, or the mean alone for one run (copy-last, --samples 1): one value has no spread."""
    if v is None or v["mean"] is None:
        return "-"
    return f"{v['mean']:.4g}" + (f" ± {v['std']:.2g}" if len(v.get("runs", ())) > 1 else "")


def format_table(results: dict, per_frame: bool = False) -> str:
    """The results JSON as a table: one row per metric, mean ± std over sampling runs per model."""
    names = list(results["models"])
    first = results["models"][names[0]]
    keys = _row_keys(first) + (
        [k for k in first if re.match(r"(psnr|ssim)(_vs_frames)?/f\d+$", k)] if per_frame else []
    )
    lines = [
        (
            f"{results['clips']} clips x {results['samples']} samples of {results['store']} "
            f"({'mean ± std over sampling runs' if results['samples'] > 1 else 'one sampling run: no spread'}; "
            f"pixels vs the {results['reference']['pixels']}; *_vs_frames vs the source's frames)"
        ),
        f"{'metric':18s}" + "".join(f"{n:>24s}" for n in names),
    ]
    for k in keys:
        cells = []
        for n in names:
            cells.append(_cell(results["models"][n].get(k)))
        lines.append(f"{k:18s}" + "".join(f"{c:>24s}" for c in cells))
    s1 = results["stage1"]
    lines.append(
        "stage 1 features:  "
        + "  ".join(
            f"{k} {s1[k]:.4g}"
            for k in ("mse", "cos", "copy_last/mse", "copy_last/cos", "seg/miou_all", "depth/absrel")
            if s1.get(k) is not None
        )
    )
    ceiling = results.get("reference_metrics", {})
    if ceiling.get("psnr" + VS_FRAMES) is not None:
        lines.append(
            "VAE ceiling (stored latents decoded vs the source's frames 13-24): "
            f"PSNR {ceiling['psnr' + VS_FRAMES]:.4g} dB  SSIM {ceiling['ssim' + VS_FRAMES]:.4g}"
        )
    for k, why in results["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a run's curve (paper figure 3)

CURVE_SCHEMA = "re2pix-curve/1"
CURVE_METRICS = ("latent_mse", "psnr", "ssim", "fid", "fvd", "seg/miou_all", "seg/miou_moving")
CURVE_COLOURS = {"re2pix": (40, 96, 220), "baseline": (220, 90, 40), COPY_LAST: (120, 120, 120)}


def run_checkpoints(run_dir) -> dict[int, Path]:
    """{step: checkpoint folder} of every complete checkpoint a run kept (train with keep_checkpoints 0
    to keep them all); a folder without meta.json (a save cut short) is not a checkpoint."""
    from model.checkpoint import read_meta

    out = {}
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if (path / "meta.json").exists():
            out[int(read_meta(path).get("step", int(path.name.removeprefix("step-"))))] = path
    return out


def curve_point(step: int, results: dict) -> dict:
    """One point of the curve: the step, the checkpoints scored and every model's mean ± std."""
    return {
        "step": step,
        "checkpoints": results["checkpoints"],
        "models": {
            name: {
                k: {"mean": v["mean"], "std": v["std"]}
                for k, v in metrics.items()
                if "/" not in k or k.startswith(("seg/", "depth/"))
            }
            for name, metrics in results["models"].items()
        },
        "stage1": {k: results["stage1"][k] for k in ("mse", "cos") if k in results["stage1"]},
    }


def plot_curve(points: list[dict], path, size=(360, 240)) -> Path:
    """A PNG of the curve: one panel per metric present (latent MSE, PSNR, SSIM, FID, FVD, mIoU), x the
    training step, one line per model (Re2Pix blue, Baseline orange), the sampling runs' std as bars."""
    from PIL import Image, ImageDraw

    metrics = [k for k in CURVE_METRICS if any(k in p["models"].get(n, {}) for p in points for n in p["models"])]
    if not points or not metrics:
        raise InferenceError("no curve to plot: no checkpoint was scored")
    pw, ph = size
    img = Image.new("RGB", (pw * len(metrics), ph), "white")
    draw = ImageDraw.Draw(img)
    steps = [p["step"] for p in points]
    lo_s, hi_s = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    for i, key in enumerate(metrics):
        x0, y0, x1, y1 = i * pw + 50, 22, (i + 1) * pw - 12, ph - 30
        vals = [
            (p["step"], n, p["models"][n][key])
            for p in points
            for n in p["models"]
            if key in p["models"][n] and p["models"][n][key]["mean"] is not None
        ]
        if not vals:
            continue
        ys = [v["mean"] + s * (v["std"] or 0) for _, _, v in vals for s in (-1, 1)]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6

        def xy(step, y, box=(x0, y0, x1, y1), span=(lo, hi)):
            (bx0, by0, bx1, by1), (a, b) = box, span
            return bx0 + (step - lo_s) / (hi_s - lo_s) * (bx1 - bx0), by1 - (y - a) / (b - a) * (by1 - by0)

        draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
        draw.text((x0, 4), key, fill="black")
        draw.text((x0 - 46, y0), f"{hi:.4g}", fill="black")
        draw.text((x0 - 46, y1 - 10), f"{lo:.4g}", fill="black")
        draw.text((x0, y1 + 4), f"step {lo_s}", fill="black")
        draw.text((x1 - 70, y1 + 4), f"step {hi_s}", fill="black")
        for name in dict.fromkeys(n for _, n, _ in vals):
            colour = CURVE_COLOURS.get(name, (90, 90, 90))
            line = sorted((s, v) for s, n, v in vals if n == name)
            if len(line) > 1:
                draw.line([xy(s, v["mean"]) for s, v in line], fill=colour, width=2)
            for s, v in line:
                (px, py), (_, top), (_, bottom) = (
                    xy(s, v["mean"]),
                    xy(s, v["mean"] + (v["std"] or 0)),
                    xy(s, v["mean"] - (v["std"] or 0)),
                )
                draw.line((px, top, px, bottom), fill=colour)
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
            draw.text(
                (x1 - 60, y0 + 4 + 12 * list(CURVE_COLOURS).index(name) if name in CURVE_COLOURS else y0 + 28),
                name,
                fill=colour,
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
