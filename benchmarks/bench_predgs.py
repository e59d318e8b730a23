"""PredGS's adapter (the Gaussian head and its render, model/gaussian_splat.py) against Stage 1's
transformer forward at the paper's size: is its overhead negligible, as PDR claims?

Random weights, one forward each under no_grad: the paper preset's masked feature transformer (12 blocks,
dim 1152, 4 context frames + the masked one on a 32 x 56 grid, 1152 PCA channels) with its linear head,
then the Gaussian head alone on the masked frame's tokens [B, 32, 56, 1152] (the part PredGS adds in
place of the linear projection; the linear projection is timed too). Prints one JSON line: the median
wall and CPU seconds of each and the adapter's share of the transformer's forward.

    python -m benchmarks.bench_predgs [--repeats 2] [--gaussians-per-token 4 --render-window 5 --render-scale 2]

On a CPU the paper size is minutes per repeat; the ratio is what carries over to a GPU roughly (the
render is a loop of window^2 small batched matmuls, which a GPU runs less efficiently than the blocks'
large ones).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jobs.cli import HelpFormatter
from model.gaussian_splat import GaussianHead
from model.stage1 import MaskedFeatureTransformer, Stage1Config


def timed(fn, repeats: int, warmup: bool = True) -> dict:
    """Median wall and CPU seconds (all threads) of `repeats` calls, after one warm-up call unless `warmup`
    is False. On a shared machine the CPU seconds are the steadier figure: other jobs stretch the wall."""
    if warmup:
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def main(argv: list[str] | None = None) -> int:
    defaults = Stage1Config.paper()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_predgs", description=__doc__,
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="clips per forward")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards of each (the heads after one warm-up)")
    parser.add_argument("--gaussians-per-token", type=int, default=defaults.gaussians_per_token, help="K")
    parser.add_argument("--render-window", type=int, default=defaults.render_window, help="window side, cells")
    parser.add_argument("--render-scale", type=int, default=defaults.render_scale, help="supersampling factor")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Stage1Config.paper(
        head="gaussian",
        gaussians_per_token=args.gaussians_per_token,
        render_window=args.render_window,
        render_scale=args.render_scale,
    )
    h, w = cfg.feature_hw
    transformer = MaskedFeatureTransformer(Stage1Config.paper()).eval()
    head = GaussianHead(cfg.dim, cfg.num_pca_channels, cfg.gaussians_per_token, cfg.render_window, cfg.render_scale)
    with torch.no_grad():  # non-zero amplitudes and spread geometry, as a trained head has
        for p in head.parameters():
            p.normal_(std=0.02)
    context = torch.randn(args.batch, cfg.context_frames, h, w, cfg.num_pca_channels)  # [B, 4, H, W, C]
    tokens = torch.randn(args.batch, h, w, cfg.dim)  # the masked frame's tokens [B, H, W, dim]
    with torch.no_grad():
        seconds = {
            # minutes per call on a CPU: what a warm-up call would settle is noise next to that
            "transformer_forward": timed(lambda: transformer(context), args.repeats, warmup=False),
            "linear_head": timed(lambda: transformer.output_proj(tokens), args.repeats),
            "gaussian_head": timed(lambda: head(tokens), args.repeats),
        }
    result = {
        "size": "paper",
        "grid": [h, w],
        "channels": cfg.num_pca_channels,
        "dim": cfg.dim,
        "layers": cfg.num_layers,
        "batch": args.batch,
        "gaussians_per_token": cfg.gaussians_per_token,
        "render_window": cfg.render_window,
        "render_scale": cfg.render_scale,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "seconds": {k: {kind: round(v, 4) for kind, v in t.items()} for k, t in seconds.items()},
        "adapter_share_of_transformer": {
            kind: round(seconds["gaussian_head"][kind] / seconds["transformer_forward"][kind], 5)
            for kind in ("wall", "cpu")
        },
        "adapter_over_linear_head": {
            kind: round(seconds["gaussian_head"][kind] / seconds["linear_head"][kind], 1) for kind in ("wall", "cpu")
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
