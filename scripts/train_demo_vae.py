"""Train the small WAN2.1 VAE of the demo (`--vae demo`): `python scripts/train_demo_vae.py`.

The "tiny" VAE preset has random weights: its latents are fine for tests but it decodes colour blobs.
This job trains the same architecture (diffusers' AutoencoderKLWan: z_dim 16, 8x spatial, 4x temporal,
causal) at a small width on clips of the built-in synthetic driving set, on the CPU, and writes

    pipeline/encoders/weights/demo_wan_vae.safetensors   the weights (float16, no pickle)
    pipeline/encoders/weights/demo_wan_vae.json          {"config": AutoencoderKLWan config with
                                                          latents_mean / latents_std, "training": ...}

Data: train split of the synthetic source with `--data-seed` (not the demo's seed 0, so the demo's own
scenes are never trained on), rendered at the source's default 144 x 256 and resized to 96 x 160 exactly
as the cache job does (the encoder's own preprocessing). Two phases: `--steps` steps of `--batch`
random windows of `--frames` frames (1 + 4k: the causal VAE's first frame plus k chunks) with a random
`--crop` (h, w) and a random horizontal flip, then `--long-steps` steps on 25-frame windows
(`--long-*`) at a smaller crop: trained on 5 frames only, the causal VAE's later chunks drift (val PSNR
fell from 23.5 dB on frames 0-4 to 14.6 dB on frame 24). `--init W --steps 0` resumes phase 2 from
saved phase-1 weights W (how the shipped weights were made: see their JSON's training.init).
Loss: L1 + `--mse-weight` * MSE on [-1, 1] pixels + `--kl-weight` * KL per latent element of the
posterior (the sampled latent is decoded during training; the cache uses the mean).

The PV-VAE objective (predictive latents, issue #28), off by default (the defaults reproduce the shipped
`--vae demo` weights; `--vae demo-predictive` is this script with the flags pipeline/encoders/vae.py's
DEMO_VAES names):
 * `--predictive-drop P`: with probability P per step the encoder sees only the frames of the windows'
   first k latent chunks (k uniform in 1..n for windows of n + 1 chunks: frame 0, then 4 frames a chunk),
   as PV-VAE does: the later frames are cut, not filled, and the k latents are padded with zeros (the
   prior's mean: no information) to the n + 1 the decoder needs; the decoder still reconstructs, and the
   loss covers, every frame of the real window. A cut keeps the causal encoder's shapes (1 + 4(k - 1)
   frames is a clip it takes, and its k latents are those of the whole window, the encoder being causal);
   filling the dropped frames instead (the last kept frame, or zeros) would feed the decoder latents of a
   still or grey continuation that the data never has. The decoder must predict the dropped frames from
   the kept latents, which pushes those to hold the motion.
 * `--motion-weight W`: W * L1 between the reconstruction's and the target's frame differences
   x[t+1] - x[t] (the motion-aware temporal-difference loss).
 * `--decoder-steps N` (`--decoder-lr`): a last phase on the phase-2 windows with the encoder (and its
   quant_conv) frozen, decoding the posterior mean (what the cache stores; the KL has no gradient left).
AdamW, linear warm-up then cosine decay, fixed seeds: the same arguments give the same weights (on the
same torch build and thread count).

After training the weights are rounded to float16 (as saved) and used for:
 * latents_mean / latents_std: per-channel mean / std of the posterior means over the 25-frame clips
   (stride 24) of the first `--stats-scenes` training scenes (so that the normalized latents the
   diffusion model sees have unit scale);
 * the reported PSNR: 25-frame clips of the synthetic *val* split at seed 0 (the demo's val scenes,
   held out), encoded to the posterior mean and decoded, against the 96 x 160 input frames.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, installed or not (as scripts/gpu_check.py)

from jobs.cli import HelpFormatter  # noqa: E402

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "encoders" / "weights"
INPUT_HW = (96, 160)


def render_clips(split: str, seed: int, num_scenes: int, frames_per_scene: int) -> np.ndarray:
    """uint8 [scenes, frames, 96, 160, 3]: the synthetic scenes, resized as the cache job resizes."""
    from pipeline.frames import resize_frames
    from pipeline.sources import get_source

    src = get_source("synthetic", split=split, seed=seed, num_scenes=num_scenes, frames_per_scene=frames_per_scene)
    out = []
    for scene in src.scenes():
        frames = np.stack([src.read_frame(scene, f) for f in src.frames(scene)])
        out.append(resize_frames(frames, INPUT_HW))
    return np.stack(out)


def to_input(clips: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between uint8-range tensors (one number over everything given)."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def evaluate(vae, clips: np.ndarray, clip_len: int = 25) -> tuple[float, list[float]]:
    """Mean PSNR of posterior-mean reconstructions of 25-frame windows (stride 24), per clip too."""
    scores = []
    for scene in clips:
        for s in range(0, len(scene) - clip_len + 1, clip_len - 1):
            x = to_input(scene[None, s : s + clip_len])
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            scores.append(psnr(to_uint8(y), to_uint8(x)))
    return float(np.mean(scores)), scores


@torch.no_grad()
def latent_stats(vae, clips: np.ndarray, clip_len: int = 25) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of posterior means over 25-frame windows (stride 24) of every clip."""
    zs = []
    for scene in clips:
        for s in range(0, len(scene) - clip_len + 1, clip_len - 1):
            z = vae.encode(to_input(scene[None, s : s + clip_len])).latent_dist.mean  # [1, 16, t, h, w]
            zs.append(z.transpose(0, 1).reshape(z.shape[1], -1))
    z = torch.cat(zs, dim=1).double()
    return [round(float(v), 5) for v in z.mean(1)], [round(float(v), 5) for v in z.std(1)]


def kept_chunks(chunks: int, rng, p: float) -> int:
    """How many of a window's `chunks` latent chunks the encoder sees under --predictive-drop p: with
    probability p, k uniform in 1..chunks - 1, else all; p 0 draws nothing (the plain trainer's random stream)."""
    if p <= 0 or chunks < 2 or rng.random() >= p:
        return chunks
    return int(rng.integers(1, chunks))


def pad_latents(z: torch.Tensor, chunks: int) -> torch.Tensor:
    """Latents [B, C, k, h, w] of the kept chunks padded with zeros to `chunks` latent frames: the prior's
    mean, which tells the decoder nothing about the dropped frames."""
    missing = chunks - z.shape[2]
    return z if missing == 0 else torch.cat([z, z.new_zeros(*z.shape[:2], missing, *z.shape[3:])], dim=2)


def motion_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the frame differences y[t+1] - y[t] and x[t+1] - x[t] of [B, 3, T, H, W]."""
    return (y.diff(dim=2) - x.diff(dim=2)).abs().mean()


def objective(y: torch.Tensor, x: torch.Tensor, post, args) -> tuple[torch.Tensor, dict]:
    """The loss of reconstruction y of window x (every frame): L1 + MSE + KL (+ the motion loss)."""
    kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
    rec = (y - x).abs().mean()
    loss = rec + args.mse_weight * ((y - x) ** 2).mean() + args.kl_weight * kl
    parts = {"l1": rec, "kl": kl}
    if args.motion_weight > 0:
        parts["motion"] = motion_loss(y, x)
        loss = loss + args.motion_weight * parts["motion"]
    return loss, parts


def training_loss(vae, x: torch.Tensor, rng, args, sample: bool = True):
    """(loss, its parts, the reconstruction) of one batch of windows x [B, 3, 1 + 4n, H, W]: the encoder
    sees the frames of the first k latent chunks (kept_chunks), the decoder reconstructs every frame of x
    from their posterior's sample (or mean) padded to n + 1 latents (pad_latents)."""
    temporal = vae.config.scale_factor_temporal
    chunks = 1 + (x.shape[2] - 1) // temporal
    k = kept_chunks(chunks, rng, args.predictive_drop)
    post = vae.encode(x[:, :, : 1 + temporal * (k - 1)]).latent_dist
    y = vae.decode(pad_latents(post.sample() if sample else post.mean, chunks)).sample
    loss, parts = objective(y, x, post, args)
    return loss, parts, y


def encoder_side(vae) -> list[torch.nn.Module]:
    """The modules that make the latents (frozen in the decoder phase)."""
    return [vae.encoder, vae.quant_conv]


def train_phase(
    vae, train: np.ndarray, rng, desc: str, steps: int, batch: int, T: int, crop, lr: float, args, decoder_only=False
):
    """AdamW, linear warm-up then cosine decay to 5 %; random windows, crops and flips (module docstring).
    decoder_only: the encoder side frozen, the posterior mean decoded."""
    from tqdm import tqdm

    for m in encoder_side(vae):
        m.requires_grad_(not decoder_only)
    params = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / args.warmup) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))) * 0.95 + 0.05),
    )
    ch, cw = crop
    bar = tqdm(range(steps), desc=f"train demo VAE, {desc}", mininterval=10)
    for _ in bar:
        idx = rng.integers(len(train), size=batch)
        starts = rng.integers(train.shape[1] - T + 1, size=batch)
        ys = rng.integers(INPUT_HW[0] - ch + 1, size=batch) // 8 * 8
        xs = rng.integers(INPUT_HW[1] - cw + 1, size=batch) // 8 * 8
        flips = rng.random(batch) < 0.5
        clips = []
        for i in range(batch):
            c = train[idx[i], starts[i] : starts[i] + T, ys[i] : ys[i] + ch, xs[i] : xs[i] + cw]
            clips.append(c[:, :, ::-1] if flips[i] else c)
        x = to_input(np.stack(clips))
        loss, parts, y = training_loss(vae, x, rng, args, sample=not decoder_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(
            **{k: f"{v.item():.4f}" for k, v in parts.items()},
            psnr=f"{psnr(to_uint8(y.detach()), to_uint8(x)):.2f}",
            refresh=False,
        )
    for m in encoder_side(vae):
        m.requires_grad_(True)


def _training_of(weights: str) -> dict | None:
    """The training record next to weights we resume from (its .json), if there is one."""
    meta = Path(weights).with_suffix(".json")
    return json.loads(meta.read_text()).get("training") if meta.is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/train_demo_vae.py", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--base-dim", type=int, default=14, help="the VAE's base channel width")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per resolution")
    p.add_argument("--steps", type=int, default=650, help="phase 1: steps on short windows")
    p.add_argument("--batch", type=int, default=2, help="phase 1: windows per step")
    p.add_argument("--frames", type=int, default=5, help="frames per training window (1 + 4k)")
    p.add_argument("--crop", type=int, nargs=2, default=[64, 96], help="training crop h w (multiples of 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="phase 1: learning rate")
    p.add_argument(
        "--long-steps",
        type=int,
        default=250,
        help="phase 2: steps on 25-frame windows (the causal "
        "VAE drifts on later chunks when it only ever saw 5 frames)",
    )
    p.add_argument("--long-batch", type=int, default=1, help="phase 2: windows per step")
    p.add_argument("--long-frames", type=int, default=25, help="phase 2: frames per window")
    p.add_argument("--long-crop", type=int, nargs=2, default=[48, 64], help="phase 2: crop h w")
    p.add_argument("--long-lr", type=float, default=3e-4, help="phase 2: learning rate")
    p.add_argument(
        "--init",
        default=None,
        help="start from these weights (.safetensors) instead of phase 1; "
        "with --steps 0 this resumes phase 2 from a saved phase 1",
    )
    p.add_argument(
        "--predictive-drop",
        type=float,
        default=0.0,
        help="PV-VAE: probability per step that the encoder sees only the first k latent chunks' frames "
        "(latents zero-padded for the decoder); the loss still covers every frame",
    )
    p.add_argument("--motion-weight", type=float, default=0.0, help="PV-VAE: weight of the L1 on frame differences")
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=0,
        help="PV-VAE: a last phase on the phase-2 windows with the encoder frozen",
    )
    p.add_argument("--decoder-lr", type=float, default=1e-4, help="the decoder phase's learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    p.add_argument("--mse-weight", type=float, default=1.0, help="weight of the pixel MSE")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term")
    p.add_argument("--train-scenes", type=int, default=48, help="synthetic training scenes")
    p.add_argument("--frames-per-scene", type=int, default=49, help="frames of each scene")
    p.add_argument("--data-seed", type=int, default=1, help="synthetic generator seed of the training scenes")
    p.add_argument("--stats-scenes", type=int, default=16, help="training scenes for latents_mean / std")
    p.add_argument("--val-scenes", type=int, default=2, help="val split, seed 0 (the demo's val scenes)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization and data order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(WEIGHTS_DIR / "demo_wan_vae"), help="output stem (.safetensors, .json)")
    args = p.parse_args(argv)

    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    train = render_clips("train", args.data_seed, args.train_scenes, args.frames_per_scene)
    val = render_clips("val", 0, args.val_scenes, args.frames_per_scene)
    print(
        f"rendered {train.shape[0]} train / {val.shape[0]} val scenes of {train.shape[1]} frames "
        f"in {time.time() - t0:.0f} s",
        flush=True,
    )

    vae = AutoencoderKLWan(base_dim=args.base_dim, num_res_blocks=args.num_res_blocks, z_dim=16)
    n_params = sum(q.numel() for q in vae.parameters())
    print(f"AutoencoderKLWan base_dim {args.base_dim}: {n_params / 1e6:.2f} M parameters", flush=True)
    if args.init:
        vae.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
        print(f"phase 1 skipped: starting from {args.init}", flush=True)
    phases = [  # (name, steps, batch, frames, crop, lr, encoder frozen)
        ("short windows", args.steps, args.batch, args.frames, args.crop, args.lr, False),
        ("25-frame windows", args.long_steps, args.long_batch, args.long_frames, args.long_crop, args.long_lr, False),
        ("decoder", args.decoder_steps, args.long_batch, args.long_frames, args.long_crop, args.decoder_lr, True),
    ]
    vae.train()
    for desc, steps, batch, frames, crop, lr, frozen in phases:
        if steps > 0:
            train_phase(vae, train, rng, desc, steps, batch, frames, crop, lr, args, decoder_only=frozen)
    train_seconds = time.time() - t0

    # round to float16 as saved, then measure with exactly the weights that ship
    vae.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    val_psnr, per_clip = evaluate(vae, val)
    mean, std = latent_stats(vae, train[: args.stats_scenes])
    print(
        f"val PSNR (posterior mean, 25-frame clips, synthetic val seed 0): {val_psnr:.2f} dB "
        f"(per clip {', '.join(f'{s:.2f}' for s in per_clip)})",
        flush=True,
    )

    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config.update(latents_mean=mean, latents_std=std)
    meta = {
        "config": config,
        "training": {
            "steps": args.steps + args.long_steps + args.decoder_steps,
            "seed": args.seed,
            "args": vars(args) | {"out": None},
            "data": {
                "source": "synthetic",
                "split": "train",
                "seed": args.data_seed,
                "num_scenes": args.train_scenes,
                "stats_scenes": args.stats_scenes,
                "frames_per_scene": args.frames_per_scene,
                "resized_to": list(INPUT_HW),
            },
            "val": {
                "source": "synthetic",
                "split": "val",
                "seed": 0,
                "num_scenes": args.val_scenes,
                "clip_frames": 25,
                "psnr_db": round(val_psnr, 3),
                "psnr_per_clip": [round(s, 3) for s in per_clip],
            },
            "phases": [
                {"name": d, "steps": st, "batch": b, "frames": f, "crop": list(c), "lr": lr, "encoder_frozen": e}
                for d, st, b, f, c, lr, e in phases
            ],
            "init": None if not args.init else {"file": Path(args.init).name, "training": _training_of(args.init)},
            "parameters": n_params,
            "dtype": "float16",
            "seconds": round(train_seconds, 1),
            "torch": torch.__version__,
            "threads": args.threads,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out.with_suffix(".safetensors")), metadata={"format": "pt"})
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    assert load_file(str(out.with_suffix(".safetensors"))).keys() == state.keys()
    size = out.with_suffix(".safetensors").stat().st_size
    print(
        f"wrote {out.with_suffix('.safetensors')} ({size / 1e6:.2f} MB) and {out.with_suffix('.json')} "
        f"in {time.time() - t0:.0f} s; val PSNR {val_psnr:.2f} dB",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
