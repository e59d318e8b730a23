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
which 13-24 are the prediction (docs/design.md, "Reading the paper": decoding, eq. 8).

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

import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference.codec import LatentCodec
from inference.encoders import load_dinov2_for, load_vae_for
from inference.figures import figure_rows, prediction_grid, prediction_video, save_png, write_mp4
from inference.inputs import open_space, store_clip, video_clip
from inference.prediction import frame_scores, predict_clip, reconstruction_scores
from inference.sampling import Sampler
from inference.stages import Models, resolve_device
from jobs.cli import random_weights_notice, run
from jobs.config import DEMO, DEMO_RUNS, DEMO_VAL_STORE, parse_config
from model.diffusion import SAMPLE_STEPS, SIGMA_MAX, SIGMA_MIN

log = logging.getLogger("re2pix.predict")


@dataclass
class PredictConfig:
    store: str | None = field(
        default=DEMO_VAL_STORE, metadata={"help": "store to take the clip from (and, for --video, the PCA basis)"}
    )
    clip: int = field(default=0, metadata={"help": "clip number in the store"})
    clip_id: str | None = field(default=None, metadata={"help": "clip by its id instead of --clip"})
    video: str | None = field(default=None, metadata={"help": "a video file or a folder of frames (>= 13 frames)"})
    pca: str | None = field(default=None, metadata={"help": "--video without --store: PCA basis path/URL"})
    geometry: str = field(default="tiny", metadata={"help": "--video without --store: tiny or paper"})
    dinov2: str | None = field(
        default=None,
        metadata={
            "aliases": ["--encoder"],
            "help": "encoder spec, as jobs.cache --encoder (None: the store's)",
        },
    )
    vae: str | None = field(default=None, metadata={"help": "VAE spec, as jobs.cache --vae (None: the store's)"})
    allow_download: bool = field(default=False, metadata={"help": "let transformers/diffusers download weights"})
    allow_weights_mismatch: bool = field(
        default=False, metadata={"help": "use encoders whose sha256 differs from the store's record"}
    )
    stage1: str = field(default=f"{DEMO_RUNS}/stage1", metadata={"help": "Stage 1 run dir or checkpoint"})
    stage2: str = field(default=f"{DEMO_RUNS}/stage2", metadata={"help": "Stage 2 (Re2Pix) run dir or checkpoint"})
    baseline: str | None = field(
        default=f"{DEMO_RUNS}/baseline",
        metadata={"help": "Baseline run dir or checkpoint; its row is left out when it holds none ('' for none)"},
    )
    weights: str = field(default="auto", metadata={"help": "auto (EMA when saved), ema or model"})
    sample_steps: int = field(default=SAMPLE_STEPS, metadata={"aliases": ["--steps"], "help": "sampler steps"})
    sample_solver: str = field(default="heun", metadata={"aliases": ["--solver"], "help": "heun or euler"})
    sigma_max: float = field(default=SIGMA_MAX, metadata={"help": "sampler's highest noise level"})
    sigma_min: float = field(default=SIGMA_MIN, metadata={"help": "sampler's lowest noise level before 0"})
    precision: str = field(
        default="auto", metadata={"help": "auto | bf16 | fp32: the sampler's network evaluations (auto: bf16 on GPU)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampling noise"})
    guidance_channels: int | None = field(default=None, metadata={"help": "representation guidance: c"})
    guidance_weight: float = field(default=0.0, metadata={"help": "representation guidance: w (0: off)"})
    out: str = field(default=f"{DEMO}/predict", metadata={"help": "output folder"})
    name: str | None = field(default=None, metadata={"help": "output file stem (default: clip id / video name)"})
    grid_frames: str = field(
        default="features",
        metadata={"help": "'features': the frames with feature maps (0, 4, ..., 24); 'all': every frame"},
    )
    cell_height: int | None = field(default=None, metadata={"help": "grid cell height in px (default: frame size)"})
    fps: float | None = field(default=None, metadata={"help": "mp4 frame rate (default: the data's)"})
    progress: bool = field(default=True, metadata={"help": "a bar over the sampler's network evaluations"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})


def figure_header(cfg: PredictConfig, clip, store, models: Models, sampler: Sampler, geometry) -> list[str]:
    """The picture's own words: which clip and frames, which checkpoints (their steps), which sampler."""
    from model.checkpoint import read_meta

    if cfg.video:
        where = f"{cfg.video}: its first {clip.source['frames_used']} frames at {clip.fps:g} fps"
    else:
        meta = store.clip_meta(clip.source["clip"])
        where = (
            f"clip {meta['clip_id']} (no. {clip.source['clip']}) of {store.location}: scene {meta['scene']}, "
            f"{geometry.clip_frames} frames from frame {meta['start']}"
        )
    steps = {name: read_meta(m["checkpoint"]).get("step") for name, m in models.describe().items()}
    run = Path(models.describe()["stage2"]["checkpoint"]).parent.parent.parent
    names = {"stage1": "Stage 1", "stage2": "Re2Pix (Stage 2)", "baseline": "Baseline"}
    checkpoints = ", ".join(f"{names[name]} step {step}" for name, step in steps.items())
    return [where, f"run {run}: {checkpoints}; {sampler.solver} sampler, {sampler.steps} steps, seed {cfg.seed}"]


@contextlib.contextmanager
def sampling_progress(models: Models, sampler: Sampler, enabled: bool = True):
    """A bar over the DiTs' network evaluations while they sample (minutes at the paper's size): steps
    (+ steps - 1 for Heun's corrections), twice for Re2Pix under representation guidance."""
    from tqdm.auto import tqdm

    per_run = sampler.steps + (sampler.steps - 1 if sampler.solver == "heun" else 0)
    guided = sampler.guidance_channels is not None and sampler.guidance_weight != 0
    nets = [(models.stage2.model, "Re2Pix", per_run * (2 if guided else 1))]
    nets += [(models.baseline.model, "Baseline", per_run)] if models.baseline else []
    bar = tqdm(total=sum(n for *_, n in nets), desc="sampling", unit="eval", disable=not enabled)

    def hook(name):
        def counted(*_) -> None:  # a forward hook that returns nothing leaves the output alone
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        return counted

    hooks = [net.register_forward_hook(hook(name)) for net, name, _ in nets]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def run_predict(cfg: PredictConfig) -> dict:
    t0 = time.time()
    device = resolve_device(cfg.device, cfg.threads)
    space, store = open_space(cfg.store, bool(cfg.video), cfg.pca, cfg.geometry)
    log.info("loading the checkpoints and the VAE on %s", device)
    random_weights_notice({"encoder": cfg.dinov2, "vae": cfg.vae}, space.manifest)
    models = Models.load(cfg.stage1, cfg.stage2, cfg.baseline, cfg.weights, device)
    basis = space.basis.fingerprint if space.basis is not None else None
    models.check(space.geometry, space.geometry.num_pca_channels, cfg.store or cfg.pca, space.manifest, basis)
    vae = load_vae_for(cfg.vae, space.manifest, space.geometry, device, cfg.allow_download, cfg.allow_weights_mismatch)
    codec = LatentCodec(vae, space.latent_norm)
    if cfg.video:
        dino = load_dinov2_for(
            cfg.dinov2, space.manifest, space.geometry, device, cfg.allow_download, cfg.allow_weights_mismatch
        )
        log.info("encoding %s: DINOv2 on its feature frames, the VAE on its frames", cfg.video)
        clip = video_clip(cfg.video, space, dino, codec)
    else:
        clip = store_clip(store, cfg.clip, cfg.clip_id)
    sampler = Sampler.of(cfg)
    log.info(
        "%s: Stage 1 forecast, then sampling %s (%d %s steps each), then VAE decoding",
        clip.name,
        "Re2Pix and the Baseline" if models.baseline else "Re2Pix",
        sampler.steps,
        sampler.solver,
    )
    with torch.no_grad(), sampling_progress(models, sampler, cfg.progress):
        pred = predict_clip(clip, models, sampler, codec, space.geometry, cfg.seed)
    name = cfg.name or clip.name
    out = Path(cfg.out)
    header = figure_header(cfg, clip, store, models, sampler, space.geometry)
    grid = prediction_grid(pred, space.geometry, cfg.grid_frames, cfg.cell_height, header)
    png = save_png(out / f"{name}.png", grid)
    mp4 = write_mp4(
        out / f"{name}.mp4", prediction_video(pred, space.geometry, cfg.cell_height), fps=cfg.fps or clip.fps
    )
    summary = {
        "name": name,
        "source": clip.source,
        "png": str(png),
        "mp4": str(mp4),
        "ground_truth": pred.ground_truth,
        "rows": ["context"] + figure_rows(pred, space.geometry),
        "frames": {
            "context": [0, space.geometry.context_frames - 1],
            "predicted": [space.geometry.context_frames, space.geometry.clip_frames - 1],
        },
        "models": models.describe(),
        "sampler": {**asdict(sampler), "seed": cfg.seed},
        "scores": frame_scores(pred, space.geometry),
    }
    if pred.reconstruction is not None and pred.ground_truth in ("source_frames", "video"):
        summary["scores_vs_vae_reconstruction"] = frame_scores(pred, space.geometry, "vae_reconstruction")
        summary["vae_reconstruction"] = reconstruction_scores(pred)
    summary["seconds"] = round(time.time() - t0, 2)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    summary["json"] = str(out / f"{name}.json")
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(PredictConfig, "predict", argv, description=__doc__)
    summary = run_predict(cfg)
    for name, s in summary["scores"].items():
        print(
            f"{name:9s} PSNR {np.mean(s['psnr']):.2f} dB  SSIM {np.mean(s['ssim']):.4f}  "
            f"(frames {summary['frames']['predicted'][0]}-{summary['frames']['predicted'][1]} vs "
            f"{summary['ground_truth']})"
        )
    if summary.get("vae_reconstruction"):
        r = summary["vae_reconstruction"]
        print(
            f"VAE reconstruction of the clip's latents vs its frames: PSNR {r['psnr']:.2f} dB  "
            f"SSIM {r['ssim']:.4f} (the ceiling)"
        )
    print(f"wrote {summary['png']}, {summary['mp4']} and {summary['json']} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
