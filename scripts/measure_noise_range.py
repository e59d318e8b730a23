"""Which sampler noise range suits the training noise law? `python scripts/measure_noise_range.py`.

Training draws log sigma ~ N(0, 1) plus a 5 % tail log sigma ~ U(log 200, log 1e5) (model/diffusion.py);
EDM's sampler starts at sigma_max 80 and ends at sigma_min 0.002, Cosmos-Predict2.5 pairs the same tail with
200 / 0.01. This trains a tiny Stage 2 Baseline (no semantic features: the question is the sampler's) on
demo-VAE latents of synthetic train clips (seed 1, as the demo VAE), then samples the held-out val clips
(seed 0, the demo's) with each range from the same noise, and prints the future-latent MSE (mean ± std over
the sampling runs) beside copy-last-latent. Deterministic for a given thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, installed or not (as scripts/gpu_check.py)

from jobs.cli import HelpFormatter, run  # noqa: E402

RANGES = {"edm (80, 0.002)": (80.0, 0.002), "cosmos (200, 0.01)": (200.0, 0.01)}


def latents_of(split: str, seed: int, scenes: int, vae) -> torch.Tensor:
    """Store-normalized latents [N, 16, 7, 12, 20] of the 25-frame clips (stride 24) of the scenes."""
    from pipeline.sources import get_source

    src = get_source("synthetic", split=split, seed=seed, num_scenes=scenes, frames_per_scene=49)
    out = []
    for scene in src.scenes():
        frames = np.stack([src.read_frame(scene, f) for f in src.frames(scene)])
        for s in (0, 24):
            out.append(vae(frames[None, s : s + 25]).float())
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python scripts/measure_noise_range.py", description=__doc__, formatter_class=HelpFormatter
    )
    ap.add_argument("--train-scenes", type=int, default=8, help="synthetic training scenes")
    ap.add_argument("--val-scenes", type=int, default=2, help="synthetic validation scenes")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny DiT")
    ap.add_argument("--batch", type=int, default=4, help="clips per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    ap.add_argument("--sample-steps", type=int, default=35, help="sampler steps")
    ap.add_argument("--samples", type=int, default=3, help="sampling runs per clip")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON of the numbers")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from model.diffusion import sample, training_loss
    from model.stage2 import DiTConfig, Re2PixDiT
    from pipeline.encoders import load_vae

    t0 = time.time()
    vae = load_vae("demo")
    train, val = latents_of("train", 1, args.train_scenes, vae), latents_of("val", 0, args.val_scenes, vae)
    print(f"{len(train)} train / {len(val)} val clips encoded in {time.time() - t0:.0f} s", flush=True)
    torch.manual_seed(0)
    model = Re2PixDiT(DiTConfig.tiny(semantic=False))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=g)
        loss, _ = training_loss(model, train[idx], None, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    future = val[:, :, 4:]
    results = {"copy_last_latent": float((val[:, :, 3:4] - future).pow(2).mean())}
    for name, (hi, lo) in RANGES.items():
        runs = []
        for r in range(args.samples):
            noise = torch.randn(future.shape, generator=torch.Generator().manual_seed(100 + r))
            pred = sample(
                model, val[:, :, :4], None, num_steps=args.sample_steps, sigma_max=hi, sigma_min=lo, initial_noise=noise
            )
            runs.append(float((pred[:, :, 4:] - future).pow(2).mean()))
        results[name] = {"mean": float(np.mean(runs)), "std": float(np.std(runs, ddof=1)), "runs": runs}
        print(f"{name}: latent MSE {np.mean(runs):.4f} ± {np.std(runs, ddof=1):.4f}", flush=True)
    print(f"copy last latent: {results['copy_last_latent']:.4f}")
    summary = {"args": vars(args), "results": results, "seconds": round(time.time() - t0, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
