"""See the future: `python -m jobs.predict --preset tiny --store runs/demo/val.zarr --clip 0`.

Input: a clip of a store (`--store S --clip i`, or `--clip-id ID`), or a video file / folder of frames
(`--video PATH`). For a video the encoders run here (never in the trainer): frames resized as the
cache job does, DINOv2 on frames 0, 4, 8, 12 (and 16, 20, 24 when present) projected with the PCA
basis of `--store` (or `--pca` with `--geometry`), and the WAN2.1 VAE on frames 0-24 when the video
has 25 frames (the causal VAE then gives the same context latents as the cache job and a ground-truth
row) or on frames 0-12 when it has 13-24 (4 context latents, no ground truth).

Then Stage 1 rolls out the features of latents 4-6 from the 4 context feature maps, Stage 2 samples
latents 4-6 conditioned on [context features, forecast features] (Re2Pix) and without features
(Baseline, when `--baseline` holds a checkpoint; its row is omitted otherwise), both from the same
initial noise (`--seed`), and the VAE decodes [z0..z3, ẑ4..ẑ6] as one sequence into 25 frames, of
which 13-24 are the prediction (DESIGN, eq. 8).

Writes OUT/NAME.png (the paper's figure: context frames and their DINOv2 features bordered green,
then ground truth, Baseline, Re2Pix and the forecast features bordered blue; features shown as RGB of
their first three PCA components, scaled per component between the 1st and 99th percentiles over
the clip), OUT/NAME.mp4 (all 25 frames, the rows side by side) and OUT/NAME.json (what was run, and
PSNR / SSIM per predicted frame against the ground truth when there is one).

A store holds latents, not pixels. For a store clip the ground truth (and the context row) are the
clip's ORIGINAL frames whenever the store's source can be reopened from its manifest (dataset, split,
source_root and the adapter's options: the synthetic generator's settings under "generator", else the
cache job's --source-options; a source_root must be an existing path or builtin): read, checked against
the stored timestamps and resized to the VAE input size exactly as the cache job resized them
(JSON "ground_truth": "source_frames"). Otherwise they are the VAE reconstruction of the stored latents
("vae_reconstruction", labelled so in the picture; "ground_truth_source" says why). With source frames
the JSON scores are against them ("scores"), and also against the VAE reconstruction
("scores_vs_vae_reconstruction": what the latent-space models can reach) together with the
reconstruction's own PSNR / SSIM against the source ("vae_reconstruction": the VAE's ceiling).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference.codec import LatentCodec
from inference.inputs import ClipInput, open_space, store_clip, video_clip
from inference.sampling import Sampler, forecast_features, sample_models, stage2_features
from inference.stages import Models, resolve_device
from jobs.config import parse_config

log = logging.getLogger("re2pix.predict")


@dataclass
class PredictConfig:
    store: str | None = field(default="runs/demo/val.zarr",
                              metadata={"help": "store to take the clip from (and, for --video, the PCA basis)"})
    clip: int = field(default=0, metadata={"help": "clip number in the store"})
    clip_id: str | None = field(default=None, metadata={"help": "clip by its id instead of --clip"})
    video: str | None = field(default=None, metadata={"help": "a video file or a folder of frames (>= 13 frames)"})
    pca: str | None = field(default=None, metadata={"help": "--video without --store: PCA basis path/URL"})
    geometry: str = field(default="tiny", metadata={"help": "--video without --store: tiny or paper"})
    dinov2: str | None = field(default=None, metadata={"help": "DINOv2 spec (default: the store's weights id)"})
    vae: str | None = field(default=None, metadata={"help": "VAE spec (default: the store's weights id)"})
    allow_download: bool = False
    allow_weights_mismatch: bool = field(default=False, metadata={
        "help": "use encoders whose sha256 differs from the store's record"})
    stage1: str = field(default="runs/demo/train/stage1", metadata={"help": "Stage 1 run dir or checkpoint"})
    stage2: str = field(default="runs/demo/train/stage2", metadata={"help": "Stage 2 (Re2Pix) run dir or checkpoint"})
    baseline: str | None = field(default="runs/demo/train/baseline", metadata={
        "help": "Baseline run dir or checkpoint; its row is left out when it holds none ('' for none)"})
    weights: str = field(default="auto", metadata={"help": "auto (EMA when saved), ema or model"})
    steps: int = field(default=35, metadata={"help": "sampler steps"})
    solver: str = field(default="heun", metadata={"help": "heun or euler"})
    seed: int = 0
    guidance_channels: int | None = field(default=None, metadata={"help": "representation guidance: c"})
    guidance_weight: float = field(default=0.0, metadata={"help": "representation guidance: w (0: off)"})
    out: str = field(default="runs/demo/predict", metadata={"help": "output folder"})
    name: str | None = field(default=None, metadata={"help": "output file stem (default: clip id / video name)"})
    grid_frames: str = field(default="features", metadata={
        "help": "'features': the frames with feature maps (0, 4, ..., 24); 'all': every frame"})
    cell_height: int | None = field(default=None, metadata={"help": "grid cell height in px (default: frame size)"})
    fps: float | None = field(default=None, metadata={"help": "mp4 frame rate (default: the data's)"})
    device: str = "auto"
    threads: int = 0


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    clip: ClipInput
    forecast: np.ndarray  # [3, H, W, c1] Stage 1 features of latents 4-6
    latents: dict  # name -> [16, 7, h, w] float32 (re2pix, baseline)
    frames: dict  # "ground truth", "Baseline", "Re2Pix" -> uint8 [25 (or 13 for GT), H, W, 3]
    ground_truth: str | None  # "source_frames", "vae_reconstruction", "video" or None
    reconstruction: np.ndarray | None = None  # store clip: the VAE decoding of its stored latents [25, H, W, 3]


def predict_clip(clip: ClipInput, models: Models, sampler: Sampler, codec: LatentCodec, geometry,
                 seed: int = 0) -> Prediction:
    m, fut = geometry.context_latents, geometry.future_latents
    device = next(models.stage2.model.parameters()).device
    context = torch.from_numpy(clip.features[None, :m]).to(device)  # [1, 4, H, W, C]
    forecast = forecast_features(models, context, fut)  # [1, 3, H, W, c1]
    features = stage2_features(context, forecast, models.stage2.model.cfg.feature_channels)
    z_ctx = torch.from_numpy(clip.latents[None, :, :m]).to(device)
    gen = torch.Generator().manual_seed(seed)  # the same noise on every device
    noise = torch.randn((1, z_ctx.shape[1], fut, *z_ctx.shape[3:]), generator=gen).to(device)
    sampled = sample_models(models, sampler, z_ctx, features, noise)
    frames, gt, recon = {}, None, None
    if "store" in clip.source and clip.latents.shape[1] == geometry.latent_frames:
        recon = codec.decode(torch.from_numpy(clip.latents[None]))[0]
    if clip.frames is not None:
        frames["ground truth"], gt = clip.frames, clip.frames_kind
    elif recon is not None:
        frames["ground truth"], gt = recon, "vae_reconstruction"
    names = {"baseline": "Baseline", "re2pix": "Re2Pix"}
    for key in ("baseline", "re2pix"):
        if key in sampled:
            frames[names[key]] = codec.decode(sampled[key])[0]
    return Prediction(clip, forecast[0].cpu().numpy(), {k: v[0].cpu().numpy() for k, v in sampled.items()},
                      frames, gt, recon)


# --------------------------------------------------------------------------- pictures


def _cell_hw(frame_hw, cell_height):
    if not cell_height:
        return tuple(frame_hw)
    return int(cell_height), max(1, round(frame_hw[1] * cell_height / frame_hw[0]))


def figure(pred: Prediction, geometry, grid_frames: str = "features", cell_height: int | None = None):
    """The paper-style grid (module docstring) as uint8 [H, W, 3]."""
    from inference.figures import CONTEXT_BORDER, PREDICTED_BORDER, Row, Section, features_to_rgb, make_grid
    if grid_frames not in ("features", "all"):
        raise SystemExit(f"--grid-frames must be 'features' or 'all', got {grid_frames!r}")
    g, r = geometry, geometry.temporal_downsample
    m = g.context_latents
    feats = np.concatenate([pred.clip.features[:m, ..., :3], pred.forecast[..., :3]])  # [7, H, W, 3]
    rgb = features_to_rgb(feats)  # one colour scale for the whole clip
    step = r if grid_frames == "features" else 1
    ctx_cols = list(range(0, g.context_frames, step))
    fut_cols = [k for k in range(g.context_frames, g.clip_frames) if grid_frames == "all" or k % r == 0]

    def feature_cells(cols):
        return [rgb[k // r] if k % r == 0 else None for k in cols]

    gt = pred.frames.get("ground truth")
    ctx_rows = [Row("context frames", [gt[k] if gt is not None else pred.frames["Re2Pix"][k] for k in ctx_cols]),
                Row("DINOv2 features\n(PCA 1-3)", feature_cells(ctx_cols))]
    fut_rows = []
    if gt is not None and len(gt) == g.clip_frames:
        label = "ground truth" + ("\n(VAE reconstruction)" if pred.ground_truth == "vae_reconstruction" else "")
        fut_rows.append(Row(label, [gt[k] for k in fut_cols]))
    for name in ("Baseline", "Re2Pix"):
        if name in pred.frames:
            fut_rows.append(Row(name, [pred.frames[name][k] for k in fut_cols]))
    fut_rows.append(Row("forecast features\n(Stage 1, PCA 1-3)", feature_cells(fut_cols)))
    sections = [Section(f"context: frames 0-{g.context_frames - 1}", ctx_rows, CONTEXT_BORDER,
                        [f"frame {k}" for k in ctx_cols]),
                Section(f"predicted: frames {g.context_frames}-{g.clip_frames - 1}", fut_rows, PREDICTED_BORDER,
                        [f"frame {k}" for k in fut_cols])]
    frame_hw = pred.frames["Re2Pix"].shape[1:3]
    return make_grid(sections, cell_hw=_cell_hw(frame_hw, cell_height))


def video(pred: Prediction, geometry, cell_height: int | None = None) -> np.ndarray:
    """Panels [25, H, W, 3]: ground truth | Baseline | Re2Pix | features, frame by frame."""
    from inference.figures import features_to_rgb, frame_panels
    g, r = geometry, geometry.temporal_downsample
    m = g.context_latents
    rgb = features_to_rgb(np.concatenate([pred.clip.features[:m, ..., :3], pred.forecast[..., :3]]))
    columns = [(name, list(pred.frames[name])) for name in ("ground truth", "Baseline", "Re2Pix")
               if name in pred.frames]
    columns.append(("features", [rgb[-(-k // r)] for k in range(g.clip_frames)]))
    frame_hw = pred.frames["Re2Pix"].shape[1:3]
    return frame_panels(columns, g.context_frames, cell_hw=_cell_hw(frame_hw, cell_height))


def figure_rows(pred: Prediction, geometry) -> list[str]:
    """The predicted section's rows, top to bottom (a ground truth shorter than a clip has none)."""
    rows = [k for k, v in pred.frames.items() if k != "ground truth" or len(v) == geometry.clip_frames]
    return rows + ["forecast features"]


def frame_scores(pred: Prediction, geometry, reference: str = "ground truth") -> dict:
    """PSNR / SSIM per predicted frame against the ground truth (when there is one), or with
    reference="vae_reconstruction" against the VAE decoding of the stored latents."""
    from inference.video_metrics import psnr, ssim
    gt = pred.frames.get("ground truth") if reference == "ground truth" else pred.reconstruction
    if gt is None or len(gt) < geometry.clip_frames:
        return {}
    s = slice(geometry.context_frames, geometry.clip_frames)
    out = {}
    for name in ("Baseline", "Re2Pix"):
        if name in pred.frames:
            out[name.lower()] = {"psnr": [round(float(v), 4) for v in psnr(pred.frames[name][s], gt[s])],
                                 "ssim": [round(float(v), 5) for v in ssim(pred.frames[name][s], gt[s])]}
    return out


def reconstruction_scores(pred: Prediction) -> dict:
    """Mean PSNR / SSIM of the VAE reconstruction against the source frames, context and predicted
    frames: the most a decoded prediction can reach."""
    from inference.video_metrics import psnr, ssim
    if pred.ground_truth != "source_frames" or pred.reconstruction is None:
        return {}
    gt, rec = pred.frames["ground truth"], pred.reconstruction
    return {"psnr": round(float(psnr(rec, gt).mean()), 4), "ssim": round(float(ssim(rec, gt).mean()), 5)}


# --------------------------------------------------------------------------- the job


def run_predict(cfg: PredictConfig) -> dict:
    from inference.figures import save_png, write_mp4
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    space, store = open_space(cfg.store, bool(cfg.video), cfg.pca, cfg.geometry)
    models = Models.load(cfg.stage1, cfg.stage2, cfg.baseline, cfg.weights, device)
    models.check(space.geometry, space.geometry.num_pca_channels)
    from inference.encoders import load_dinov2_for, load_vae_for
    vae = load_vae_for(cfg.vae, space.manifest, space.geometry, device, cfg.allow_download, cfg.allow_weights_mismatch)
    codec = LatentCodec(vae, space.latent_norm)
    if cfg.video:
        dino = load_dinov2_for(cfg.dinov2, space.manifest, space.geometry, device, cfg.allow_download,
                               cfg.allow_weights_mismatch)
        clip = video_clip(cfg.video, space, dino, codec)
    else:
        clip = store_clip(store, cfg.clip, cfg.clip_id)
    sampler = Sampler(cfg.steps, cfg.solver, cfg.guidance_channels, cfg.guidance_weight)
    with torch.no_grad():
        pred = predict_clip(clip, models, sampler, codec, space.geometry, cfg.seed)
    name = cfg.name or clip.name
    out = Path(cfg.out)
    png = save_png(out / f"{name}.png", figure(pred, space.geometry, cfg.grid_frames, cfg.cell_height))
    mp4 = write_mp4(out / f"{name}.mp4", video(pred, space.geometry, cfg.cell_height), fps=cfg.fps or clip.fps)
    summary = {"name": name, "source": clip.source, "png": str(png), "mp4": str(mp4),
               "ground_truth": pred.ground_truth, "rows": ["context"] + figure_rows(pred, space.geometry),
               "frames": {"context": [0, space.geometry.context_frames - 1],
                          "predicted": [space.geometry.context_frames, space.geometry.clip_frames - 1]},
               "models": models.describe(), "sampler": {**asdict(sampler), "seed": cfg.seed},
               "scores": frame_scores(pred, space.geometry)}
    if pred.ground_truth == "source_frames":
        summary["scores_vs_vae_reconstruction"] = frame_scores(pred, space.geometry, "vae_reconstruction")
        summary["vae_reconstruction"] = reconstruction_scores(pred)
    summary["seconds"] = round(time.time() - t0, 2)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    summary["json"] = str(out / f"{name}.json")
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(PredictConfig, "predict", argv, description=__doc__)
    from pipeline.encoders import EncoderWeightsError
    from pipeline.store.format import StoreError
    try:
        summary = run_predict(cfg)
    except (StoreError, EncoderWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, s in summary["scores"].items():
        print(f"{name:9s} PSNR {np.mean(s['psnr']):.2f} dB  SSIM {np.mean(s['ssim']):.4f}  "
              f"(frames {summary['frames']['predicted'][0]}-{summary['frames']['predicted'][1]} vs "
              f"{summary['ground_truth']})")
    if summary.get("vae_reconstruction"):
        r = summary["vae_reconstruction"]
        print(f"VAE reconstruction of the stored latents vs the source frames: PSNR {r['psnr']:.2f} dB  "
              f"SSIM {r['ssim']:.4f} (the ceiling)")
    print(f"wrote {summary['png']}, {summary['mp4']} and {summary['json']} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
