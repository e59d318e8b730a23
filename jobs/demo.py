"""The whole product in one command (`make demo`), on the built-in synthetic driving set, tiny models, CPU:

cache a train and a val store (Ray, the demo DINOv2 and the demo WAN VAE: small, trained on the synthetic
set, `--encoder`, `--vae`) -> train Stage 1 (`--forecaster`: PredGS, the best of `make experiment`'s
forecaster table) -> roll it out into the stores -> train Stage 2 (Re2Pix) and
the Baseline -> train a small segmentation head on the train store's features against the synthetic
class maps -> evaluate Re2Pix, the Baseline and copy-last-frame on val (latent MSE, PSNR, SSIM, and the
head's mIoU on the demo DINOv2's features of each decoded prediction, all classes and the moving ones)
-> predict one val clip and draw it (context and ground truth rows: the synthetic source's frames).
Each step is the same job a user runs by hand; the summary names every file it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inference.experiment_report import FORECASTERS as EXPERIMENT_FORECASTERS
from jobs.cli import HelpFormatter, replace_run_folder, side_by_side, step
from jobs.cli import run as run_main

# Stage 1's settings over the tiny preset's, as make experiment's forecaster table trains them
FORECASTERS = {name: dict(EXPERIMENT_FORECASTERS)[name] for name in ("predgs", "regression")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--run",
        default="runs/demo",
        help="everything goes under this folder (replaced when the demo wrote it; any other folder is refused)",
    )
    p.add_argument("--train-scenes", type=int, default=8, help="synthetic scenes of 49 frames: 7 clips each")
    p.add_argument("--val-scenes", type=int, default=2, help="synthetic scenes of the val store")
    p.add_argument(
        "--eval-clips",
        type=int,
        default=None,
        help="val clips to evaluate (default all 14: the first 8 are mostly one scene and ranked the models otherwise)",
    )
    p.add_argument("--samples", type=int, default=2, help="sampling runs per clip in the evaluation")
    p.add_argument(
        "--encoder",
        default="demo",
        help="DINOv2 spec for both stores: 'demo' (tiny, trained on the synthetic set: `python "
        "scripts/train_demo_dinov2.py`), 'tiny' (random weights) or as jobs.cache",
    )
    p.add_argument(
        "--vae",
        default="demo",
        help="VAE spec for both stores: 'demo' (small, trained on the "
        "synthetic set: `python scripts/train_demo_vae.py`), 'tiny' (random weights) or as jobs.cache",
    )
    p.add_argument(
        "--forecaster",
        choices=sorted(FORECASTERS),
        default="predgs",
        help="Stage 1's output head and loss: predgs (Gaussian head, L1 + SSIM: the lowest feature MSE of "
        "make experiment's forecaster table) or regression (linear head, SmoothL1: the tiny preset's)",
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    replace_run_folder(run, "demo")
    store, val = run / "store.zarr", run / "val.zarr"
    t0, timings = time.time(), {}

    def cache(split: str, out: Path, scenes: int, *extra: str) -> list[str]:
        options = json.dumps({"num_scenes": scenes, "frames_per_scene": 49})
        job = ["jobs.cache", "--preset", "tiny", "--split", split, "--out", str(out), *extra]
        return job + ["--encoder", args.encoder, "--vae", args.vae, "--source-options", options]

    step("cache train", cache("train", store, args.train_scenes), timings)
    step("cache val", cache("val", val, args.val_scenes, "--pca", str(store)), timings)  # train's PCA basis
    step("store info", ["jobs.store", "info", str(store)], timings)
    train = ["jobs.train", "--preset", "tiny", "--store", str(store), "--val-store", str(val)]
    train += ["--run-dir", str(run / "train")]
    head = ["jobs.train_dpt", "--preset", "tiny", "--store", str(store), "--tasks", "segmentation", "--threads", "1"]
    side_by_side(
        [
            [
                ("train Stage 1", [*train, "--stage", "1", "--stage1", json.dumps(FORECASTERS[args.forecaster])]),
                (
                    "rollout Stage 1",
                    ["jobs.rollout", "--checkpoint", str(run / "train/stage1"), "--store", f"{store},{val}"],
                ),
                ("train Stage 2 (Re2Pix)", [*train, "--stage", "2"]),
            ],
            [
                ("train Baseline", [*train, "--stage", "baseline", "--no-progress"]),
                ("train segmentation head", [*head, "--out", str(run / "heads")]),
            ],
        ],
        run / "logs",
        timings,
    )
    results = run / "eval" / "results.json"
    on_val = ["--preset", "tiny", "--store", str(val)]  # evaluate and predict read the same models
    on_val += ["--stage1", str(run / "train/stage1"), "--stage2", str(run / "train/stage2")]
    on_val += ["--baseline", str(run / "train/baseline")]
    evaluate = ["jobs.evaluate", *on_val, "--samples", str(args.samples)]
    evaluate += [] if args.eval_clips is None else ["--max-clips", str(args.eval_clips)]
    evaluate += ["--seg-head", str(run / "heads" / "seg.safetensors"), "--labels", "source", "--out", str(results)]
    step("evaluate", evaluate, timings)
    step("predict", ["jobs.predict", *on_val, "--clip", "0", "--out", str(run / "predict")], timings)
    print(summary(run, results, timings, time.time() - t0))
    return 0


MODELS = ("re2pix", "baseline", "copy_last")
METRICS = {  # psnr / ssim: vs the VAE reconstruction; *_vs_frames: vs the synthetic source's frames
    "latent_mse": "low",
    "psnr": "high",
    "ssim": "high",
    "psnr_vs_frames": "high",
    "ssim_vs_frames": "high",
    "seg/miou_all": "high",
    "seg/miou_moving": "high",
}


def summary(run: Path, results: Path, timings: dict, total: float) -> str:
    r = json.loads(results.read_text())
    lines = ["", "=" * 72, f"re2pix demo finished in {total / 60:.1f} min", ""]
    lines += [f"  {title:<52s} {sec:6.0f} s" for title, sec in timings.items()]
    lines += [
        "",
        f"Re2Pix vs Baseline vs copy-last-frame on {r['clips']} val clips x {r['samples']} samples "
        "(mean +- std over samples; copy-last is deterministic):",
        f"  {'':22s}" + "".join(f"{name:>22s}" for name in MODELS),
    ]
    models = r["models"]
    for metric, better in METRICS.items():
        if not any(metric in models.get(name, {}) for name in MODELS):
            continue  # no *_vs_frames scores when the source was not readable
        cells = []
        for name in MODELS:
            m = models.get(name, {}).get(metric)
            cells.append(f"{m['mean']:.4f} +- {m['std']:.4f}" if m and m["mean"] is not None else "-")
        lines.append(f"  {metric + ' (' + better + ')':<22s}" + "".join(f"{c:>22s}" for c in cells))
    ceiling = r.get("reference_metrics", {})
    if ceiling.get("psnr_vs_frames") is not None:
        lines.append(
            f"  VAE ceiling (ground-truth latents decoded vs the frames): psnr {ceiling['psnr_vs_frames']:.4f}, "
            f"ssim {ceiling['ssim_vs_frames']:.4f}"
        )
    s1 = r.get("stage1", {})
    frames = sorted(k.split("/")[0] for k in s1 if k.startswith("t") and k.endswith("/mse"))
    if frames and all(f"copy_last/{t}/mse" in s1 for t in frames):  # the forecast against copying the last frame
        mse = ", ".join(f"{t} {s1[f'{t}/mse']:.3f} ({s1[f'copy_last/{t}/mse']:.3f})" for t in frames)
        lines.append(f"  stage 1      feature MSE per future frame, copy-last in brackets: {mse}")
    elif s1:
        keys = [k for k in s1 if k.endswith("mse") and "/" not in k][:1] or list(s1)[:1]
        lines.append(f"  stage 1      {', '.join(f'{k} {s1[k]:.4f}' for k in keys)}")
    pictures = sorted((run / "predict").glob("*.png"))
    lines += [
        "",
        "files:",
        f"  stores           {run / 'store.zarr'}, {run / 'val.zarr'}",
        f"  checkpoints      {run / 'train'}/{{stage1,stage2,baseline}} (metrics.jsonl in each)",
        f"  seg head         {run / 'heads' / 'seg.safetensors'} (summary.json beside it)",
        f"  evaluation       {results}",
        *[f"  picture          {pic}" for pic in pictures],
        *[f"  video            {v}" for v in sorted((run / "predict").glob("*.mp4"))],
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
