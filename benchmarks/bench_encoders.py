"""Benchmark of the registered frozen encoders at real size with random weights: `python -m benchmarks.bench_encoders`.

Feature encoders: DINOv2-Reg ViT-B/14 (the paper's), SigLIP-2 ViT-B/16, V-JEPA 2 ViT-L/16 (4-frame
windows); VAEs: WAN2.1 and Wan2.2 (`AutoencoderKLWan` defaults / Wan2.2-TI2V-5B's VAE config).
Each runs through the same loader and call the cache job uses, on the CPU (or --device) at a reduced
resolution (said in the output: real sizes would take minutes per frame on a CPU), and is reported
as seconds per feature frame / per clip and as a ratio to the paper's encoder measured in the same run.
Figures, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jobs.cli import HelpFormatter, run

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (latents_mean/std: per-channel statistics; the
# benchmark's random weights make their values irrelevant, so unit ones are used)
WAN22_CONFIG = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}


def _time(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - t0) / repeats


def bench_features(device: str, frames: int, repeats: int) -> list[dict]:
    import numpy as np
    import torch
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        VJEPA2Config,
        VJEPA2Model,
    )

    from pipeline.encoders.backbones import SIGLIP_MEAN, SIGLIP_STD, ImageBackbone
    from pipeline.encoders.dinov2 import DinoV2Encoder
    from pipeline.encoders.video import VideoBackbone

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (frames, 224, 392, 3), dtype=np.uint8)
    win = rng.integers(0, 256, (frames, 4, 256, 256, 3), dtype=np.uint8)
    encoders = [
        (
            "DINOv2-Reg ViT-B/14",
            DinoV2Encoder(
                Dinov2WithRegistersModel(
                    Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4)
                ),
                input_hw=(224, 392),
                device=device,
            ),
            img,
        ),
        (
            "SigLIP-2 ViT-B/16",
            ImageBackbone(
                SiglipVisionModel(SiglipVisionConfig()),
                name="siglip2",
                input_hw=(224, 384),
                layers=(3, 6, 9, 12),
                mean=SIGLIP_MEAN,
                std=SIGLIP_STD,
                device=device,
            ),
            img,
        ),
        ("V-JEPA 2 ViT-L/16, 4-frame windows", VideoBackbone(VJEPA2Model(VJEPA2Config()), device=device), win),
    ]
    rows = []
    for name, enc, x in encoders:
        s = _time(enc, x, repeats) / frames
        params = sum(p.numel() for p in enc.model.parameters())
        rows.append(
            {
                "encoder": name,
                "params_m": round(params / 1e6, 1),
                "input": list(enc.input_hw),
                "grid": list(enc.grid_hw),
                "feature_dim": enc.feature_dim,
                "s_per_frame": round(s, 4),
            }
        )
        del enc
    for r in rows:
        r["vs_dinov2"] = round(r["s_per_frame"] / rows[0]["s_per_frame"], 2)
    return rows


def bench_vaes(device: str, clip_hw: tuple[int, int], clip_frames: int, repeats: int) -> list[dict]:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from pipeline.encoders.vae import WanVAEEncoder

    torch.manual_seed(0)
    clip = np.random.default_rng(0).integers(0, 256, (1, clip_frames, *clip_hw, 3), dtype=np.uint8)
    rows = []
    for name, config in (("WAN2.1 VAE", {}), ("Wan2.2 VAE", WAN22_CONFIG)):
        vae = WanVAEEncoder(AutoencoderKLWan(**config), input_hw=clip_hw, device=device)
        s = _time(vae, clip, repeats)
        rows.append(
            {
                "vae": name,
                "params_m": round(sum(p.numel() for p in vae.vae.parameters()) / 1e6, 1),
                "clip": [clip_frames, *clip_hw],
                "latents": list(vae(clip).shape[1:]),
                "s_per_clip": round(s, 3),
            }
        )
        del vae
    for r in rows:
        r["vs_wan21"] = round(r["s_per_clip"] / rows[0]["s_per_clip"], 2)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_encoders", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--frames", type=int, default=2, help="feature frames per call")
    p.add_argument("--clip-frames", type=int, default=9, help="frames per VAE clip (1 + 4k)")
    p.add_argument("--clip-hw", type=int, nargs=2, default=[96, 160], help="VAE input size (multiple of 32)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per encoder")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    where = f"{args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu" else args.device
    print(
        f"frozen encoders at real size, random weights, on {where}; reduced resolution "
        f"(the paper's: 448x784 features, 25x432x768 clips)"
    )
    feats = bench_features(args.device, args.frames, args.repeats)
    for r in feats:
        print(
            f"  {r['encoder']:<36} {r['params_m']:>7}M  input {r['input']} -> {r['grid']} x {r['feature_dim']}  "
            f"{r['s_per_frame']:.3f} s/frame  ({r['vs_dinov2']}x DINOv2)"
        )
    vaes = bench_vaes(args.device, tuple(args.clip_hw), args.clip_frames, args.repeats)
    for r in vaes:
        print(
            f"  {r['vae']:<36} {r['params_m']:>7}M  clip {r['clip']} -> latents {r['latents']}  "
            f"{r['s_per_clip']:.3f} s/clip  ({r['vs_wan21']}x WAN2.1)"
        )
    print(json.dumps({"features": feats, "vaes": vaes}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
