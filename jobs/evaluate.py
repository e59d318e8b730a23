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
- `copy_last` is scored as a model: the last context latent copied into every future one (one run).
- `psnr`, `ssim` (and per frame `f13`..`f24`): decoded frames 13-24 against the VAE reconstruction of the
  stored latents (the VAE-independent measure: the VAE's own error is on both sides).
- `fid` / `fvd` (Inception-v3 / I3D features, inference/video_metrics.py) when --fid-weights / --fvd-weights
  give the networks, against the same reconstruction.
- `psnr_vs_frames`, `ssim_vs_frames`, `fid_vs_frames`, `fvd_vs_frames` (and per frame): the same against the
  source's REAL frames 13-24, resized as the cache job resized them (jobs/predict.py's path), whenever the
  store's source reopens here (the synthetic set always does; `reference.frames` says which); then
  `reference_metrics` holds the reconstruction's own `*_vs_frames` scores: the VAE's ceiling. A source that
  does not reopen (moved data) is one `skipped` line, and only the reconstruction-referenced scores remain.
- `seg/miou_all`, `seg/miou_moving`, `depth/absrel`, `depth/delta1` on `--annotated-frame` with DPT heads
  (`--seg-head`, `--depth-head`) on DINOv2 features of the decoded frame (inference/semantic.py), against
  `--labels DIR` ({clip_id}.png trainIds), `--depth-labels DIR` ({clip_id}.npy), gtFine for Cityscapes
  stores, or `source` (the synthetic set's class maps and depth); `--depth-labels pseudo-depth`: the store's
  Depth Anything pseudo-depth (cache --pseudo-depth), normalized per frame as train_dpt does. Else the JSON says why.

`--every-checkpoint`: score every checkpoint the Stage 2 run kept (train it with keep_checkpoints 0 to keep
them all), each against the Baseline's checkpoint of the same step: the curve (inference/curve.py), the
paper's figure 3 for any run, to `--curve` (default: curve.json beside --out) and its plot (.png beside it).

JSON written to `--out`: inference/record.py (schema "re2pix-evaluation/1"; models re2pix, baseline, copy_last).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inference import InferenceError
from inference.codec import LatentCodec
from inference.curve import format_curve, score_checkpoints
from inference.decode_cache import DecodeCache
from inference.encoders import load_dinov2_for, load_vae_for
from inference.evaluation import FEATURES, evaluate_store, format_table
from inference.inputs import DataSpace
from inference.labels import Labels
from inference.record import evaluation_record, write_json
from inference.sampling import Sampler
from inference.semantic import Semantic, load_heads
from inference.stages import Models, resolve_device
from inference.video_metrics import load_feature_networks
from jobs.cli import random_weights_notice, run
from jobs.config import DEMO, DEMO_RUNS, DEMO_VAL_STORE, parse_config
from model.diffusion import SAMPLE_STEPS, SIGMA_MAX, SIGMA_MIN
from pipeline.store.format import StoreError
from pipeline.store.reader import Store

log = logging.getLogger("re2pix.evaluate")


@dataclass
class EvaluateConfig:
    store: str = field(default=DEMO_VAL_STORE, metadata={"help": "the store to evaluate on (its val split)"})
    val_scenes: str | None = field(
        default=None,
        metadata={
            "help": "a training run's val_scenes.json (RUN/train/val_scenes.json, written when it held scenes out "
            "for lack of a --val-store): evaluate those clips of the store it names instead of --store"
        },
    )
    stage1: str = field(default=f"{DEMO_RUNS}/stage1", metadata={"help": "Stage 1 run dir or checkpoint"})
    stage2: str = field(default=f"{DEMO_RUNS}/stage2", metadata={"help": "Stage 2 (Re2Pix) run dir or checkpoint"})
    baseline: str | None = field(
        default=f"{DEMO_RUNS}/baseline", metadata={"help": "Baseline run dir; skipped when it holds no checkpoint"}
    )
    weights: str = field(default="auto", metadata={"help": "auto (EMA when saved), ema or model"})
    samples: int = field(default=3, metadata={"help": "sampling runs per clip (mean ± std across them)"})
    max_clips: int | None = field(default=None, metadata={"help": "evaluate the first N clips (None: all)"})
    batch_size: int = field(default=4, metadata={"help": "clips per batch"})
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
    channels: int | None = field(
        default=None, metadata={"help": "Stage 2 reads only the first c PCA channels (paper table 5); default all"}
    )
    features: str = field(
        default="forecast",
        metadata={
            "help": "what Re2Pix reads for the future frames: forecast (Stage 1's rollout) or truth (the store's own "
            "future features: a perfect forecaster, the upper bound a better Stage 1 can reach)"
        },
    )
    decode: bool = field(default=True, metadata={"help": "--no-decode: feature and latent metrics only"})
    decode_cache: str | None = field(
        default=None,
        metadata={
            "help": "folder that keeps the decodes every evaluation of this store repeats (the VAE reconstruction "
            "and copy-last), named by the latents' and the VAE's sha256: the next evaluation reads them"
        },
    )
    ssim_channels: str = field(default="rgb", metadata={"help": "rgb (mean of channels) or luma"})
    fid: bool = field(default=False, metadata={"help": "require FID (on by itself when --fid-weights is given)"})
    fid_weights: str | None = field(default=None, metadata={"help": "pytorch-fid Inception .pth or TorchScript"})
    fvd: bool = field(default=False, metadata={"help": "require FVD (on by itself when --fvd-weights is given)"})
    fvd_weights: str | None = field(default=None, metadata={"help": "I3D TorchScript (i3d_torchscript.pt)"})
    seg_head: str | None = field(default=None, metadata={"help": "DPT segmentation head (safetensors)"})
    depth_head: str | None = field(default=None, metadata={"help": "DPT depth head (safetensors)"})
    labels: str | None = field(default=None, metadata={"help": "folder of {clip_id}.png trainId maps, or source"})
    depth_labels: str | None = field(default=None, metadata={"help": "{clip_id}.npy folder, source or pseudo-depth"})
    annotated_frame: int = field(default=16, metadata={"help": "clip frame the labels annotate"})
    dinov2: str | None = field(
        default=None,
        metadata={"aliases": ["--encoder"], "help": "feature encoder spec for the DPT heads (None: the store's)"},
    )
    vae: str | None = field(default=None, metadata={"help": "VAE spec, as jobs.cache --vae (None: the store's)"})
    allow_download: bool = field(default=False, metadata={"help": "let transformers/diffusers download weights"})
    allow_weights_mismatch: bool = field(
        default=False, metadata={"help": "use encoders whose sha256 differs from the store's record"}
    )
    out: str | None = field(default=f"{DEMO}/eval/results.json", metadata={"help": "JSON results path"})
    every_checkpoint: bool = field(default=False, metadata={"help": "score every kept Stage 2 checkpoint: the curve"})
    curve: str | None = field(default=None, metadata={"help": "curve JSON path (default curve.json beside --out)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    progress: bool = field(default=True, metadata={"help": "a progress bar per sample run"})


def run_evaluate(cfg: EvaluateConfig) -> dict:
    t0 = time.time()
    if cfg.samples < 1:
        raise InferenceError("--samples must be at least 1")
    if cfg.features not in FEATURES:
        raise InferenceError(f"--features {cfg.features!r}: use one of {', '.join(FEATURES)}")
    device = resolve_device(cfg.device, cfg.threads)
    skipped: dict[str, str] = {}
    fid_net, fvd_net = load_feature_networks(
        cfg.fid, cfg.fid_weights, cfg.fvd, cfg.fvd_weights, cfg.decode, device, skipped
    )
    store, held_out = held_out_clips(cfg.val_scenes) if cfg.val_scenes else (Store(cfg.store), None)
    space = DataSpace.of_store(store)
    random_weights_notice({"vae": cfg.vae}, store.manifest)
    if store.manifest.get("split") not in ("val", "test") and held_out is None:
        log.warning("%s holds the %r split, not a validation split", cfg.store, store.manifest.get("split"))
    models = Models.load(cfg.stage1, cfg.stage2, cfg.baseline, cfg.weights, device)
    models.check(store.geometry, store.num_channels, cfg.store, store.manifest)
    if not models.baseline:
        skipped["baseline"] = f"no Baseline checkpoint at {cfg.baseline}"
    weights = (cfg.allow_download, cfg.allow_weights_mismatch)
    vae = load_vae_for(cfg.vae, store.manifest, store.geometry, device, *weights) if cfg.decode else None
    codec = LatentCodec(vae, space.latent_norm) if vae else None
    decode_cache = DecodeCache(cfg.decode_cache, codec) if codec and cfg.decode_cache else None
    labels = Labels(store.manifest, cfg.annotated_frame, cfg.labels, cfg.depth_labels, store)
    heads = load_heads(cfg.seg_head, cfg.depth_head, labels, space, device, skipped)
    dinov2 = heads and cfg.decode
    dino = load_dinov2_for(cfg.dinov2, store.manifest, store.geometry, device, *weights) if dinov2 else None
    semantic = Semantic(heads, labels, space, cfg.annotated_frame, dino)
    sampler = Sampler.of(cfg)
    clips = list(range(len(store))) if held_out is None else held_out
    clips = clips[: cfg.max_clips] if cfg.max_clips is not None else clips
    n = len(clips)
    if n == 0:
        raise StoreError(f"{store.location} has no clips")

    measured = evaluate_store(
        store,
        models,
        sampler,
        codec,
        semantic,
        clips=clips,
        samples=cfg.samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        features=cfg.features,
        decode_cache=decode_cache,
        device=device,
        fid_net=fid_net,
        fvd_net=fvd_net,
        ssim_channels=cfg.ssim_channels,
        progress=cfg.progress,
    )
    frames = measured["frames_reference"]
    if frames and frames["pixels"] is None:
        skipped["scores_vs_frames"] = (
            f"the store's source is not readable here ({frames['why']}): scores vs the VAE reconstruction only"
        )
    for key, ids in measured["missing_labels"].items():
        skipped[f"{key}_labels"] = f"{len(ids)} of {n} clips have no label, left out: {ids[:5]}"
    results = evaluation_record(
        store.location if held_out is not None else cfg.store,
        store.manifest,
        measured,
        decoded=cfg.decode,
        clips=n,
        samples=cfg.samples,
        annotated_frame=cfg.annotated_frame,
        sampler={**asdict(sampler), "seed": cfg.seed},
        features=cfg.features,
        checkpoints=models.describe(),
        skipped=skipped,
        seconds=round(time.time() - t0, 1),
    )
    if cfg.out:
        write_json(cfg.out, results)
    return results


def held_out_clips(path: str) -> tuple[Store, list[int]]:
    """The store and clips a training run held out (pipeline.store.tables.held_out_record), checked by clip id."""
    import json

    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InferenceError(
            f"--val-scenes {path} does not exist (written by a training run without --val-store)"
        ) from None
    except json.JSONDecodeError as e:
        raise InferenceError(f"--val-scenes {path} is not valid JSON: {e}") from e
    store = Store(record["store"])
    ids = store.clip_ids
    if any(i >= len(ids) or ids[i] != cid for i, cid in zip(record["clips"], record["clip_ids"])):
        raise InferenceError(f"--val-scenes {path}: {record['store']} no longer holds the clips it names")
    log.info(
        "evaluating the %d clips held out of %s (scenes %s)", len(record["clips"]), record["store"], record["scenes"]
    )
    return store, record["clips"]


def run_curve(cfg: EvaluateConfig) -> dict:
    """Every kept Stage 2 checkpoint scored (with the Baseline's of the same step): the run's curve."""
    from dataclasses import replace

    def evaluate(stage2: str, baseline: str | None) -> dict:
        return run_evaluate(replace(cfg, stage2=stage2, baseline=baseline, out=None))

    path = cfg.curve or Path(cfg.out or EvaluateConfig.out).with_name("curve.json")
    return score_checkpoints(cfg.store, cfg.stage2, cfg.baseline, cfg.samples, evaluate, path)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, _ = parse_config(EvaluateConfig, "evaluate", argv, description=__doc__)
    if cfg.every_checkpoint:
        curve = run_curve(cfg)
        print(format_curve(curve))
        return 0
    results = run_evaluate(cfg)
    print(format_table(results))
    if cfg.out:
        print(f"wrote {cfg.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
