"""bf16 against float32 sampling on trained models: the sample's relative error and the time ratio.

The same clips, the same initial noise, the same Heun steps; only the network's evaluations change
precision (the sampler's update arithmetic stays float32: inference/sampling.py). Prints one JSON line:
the relative latent error of the bf16 samples against the float32 ones, each precision's future-latent
MSE against the stored latents, and the seconds of each.

    python -m benchmarks.bench_precision --run runs/demo --store runs/demo/val.zarr [--clips 4]

On a CPU without bf16 units bf16 is slower; the error is what carries over to a GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from inference.sampling import Sampler, clip_noise, forecast_features, sample_models, stage2_features
from inference.stages import Models
from jobs.cli import HelpFormatter
from pipeline.store.reader import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_precision", description=__doc__,
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--run", default="runs/demo", help="run folder holding train/{stage1,stage2,baseline}")
    parser.add_argument("--store", default="runs/demo/val.zarr", help="the clips to sample")
    parser.add_argument("--clips", type=int, default=4, help="clips sampled (the store's first)")
    parser.add_argument("--steps", type=int, default=20, help="Heun steps (the demo's evaluation uses 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    store = Store(args.store)
    models = Models.load(*(f"{args.run}/train/{s}" for s in ("stage1", "stage2", "baseline")))
    g = store.geometry
    m, fut = g.context_latents, g.future_latents
    c = max(models.stage1.model.config.num_pca_channels, models.stage2.model.cfg.num_pca_channels)
    clips = [store.read_clip(i, channels=c) for i in range(min(args.clips, len(store)))]
    feats = torch.from_numpy(np.stack([x.features for x in clips])).float()
    latents = torch.from_numpy(np.stack([x.latents for x in clips])).float()
    conditioning = stage2_features(feats[:, :m], forecast_features(models, feats[:, :m], fut),
                                   models.stage2.model.cfg.num_pca_channels)  # fmt: skip
    noise = clip_noise(args.seed, 0, list(range(len(clips))), (latents.shape[1], fut, *latents.shape[3:]))
    out, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        sampler = Sampler(steps=args.steps, precision=precision)
        start = time.perf_counter()
        with torch.no_grad():
            out[precision] = sample_models(models, sampler, latents[:, :, :m], conditioning, noise)
        seconds[precision] = time.perf_counter() - start
    result = {"clips": len(clips), "steps": args.steps, "device": "cpu", "threads": torch.get_num_threads()}
    for name in out["fp32"]:
        a, b = out["fp32"][name][:, :, m:], out["bf16"][name][:, :, m:]
        truth = latents[:, :, m:]
        result[name] = {
            "bf16_rel_error": round(float((b - a).norm() / a.norm()), 5),
            "latent_mse_fp32": round(float((a - truth).pow(2).mean()), 5),
            "latent_mse_bf16": round(float((b - truth).pow(2).mean()), 5),
        }
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["bf16_time_ratio"] = round(seconds["bf16"] / seconds["fp32"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
