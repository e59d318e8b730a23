"""What the paper's sizes cost on this machine's GPU, in one run (`make gpu-check`, <= 8 minutes on one GPU).

Needs only PyTorch and einops (transformers / diffusers for the encoder checks, skipped without them);
it imports the project's model code from this checkout, not an installed package. Prints one JSON line
per check: {"check", "ok", "seconds", "peak_gib", ...figures}; a failing check prints its error and
the others still run. Without CUDA (or with --cpu-smoke) every check runs the same code at tiny sizes
(tests/test_gpu_check.py keeps that mode working).

Checks: to_device (pinned channel-blocked batch -> GPU, GB/s); memory (a training step's peak against
model/memory.py's estimate); dit_step (the paper DiT in bf16 at micro-batch 1 and 2, with and without
activation checkpointing: steps/s, MFU, activation memory per clip); host_syncs (per training step);
stage1_step (Stage 1 at 8 windows); ddp (one rank: NCCL on GPU, gloo on CPU); sampler (seconds per
network evaluation in bf16 and fp32, and the bf16 latents' error); dinov2 / vae (real-size random-weight
encoders: encode rate, bf16 vs fp32 error); compile (torch.compile's gain on the DiT step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import diffusion  # noqa: E402
from model.memory import GiB, dit_footprint, stage1_footprint  # noqa: E402
from model.runtime import autocast_network, fast_math, to_device  # noqa: E402
from model.stage1 import MaskedFeatureTransformer, Stage1Config  # noqa: E402
from model.stage1 import loss as stage1_loss  # noqa: E402
from model.stage2 import DiTConfig, Re2PixDiT  # noqa: E402
from pipeline.store.geometry import PAPER, Geometry  # noqa: E402

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


@dataclass
class Sizes:
    """The models and geometry a run checks: the paper's on a GPU, tiny ones in the CPU smoke mode."""

    geometry: Geometry
    dit: DiTConfig
    stage1: Stage1Config
    windows: int  # Stage 1 micro-batch
    sampler_steps: int
    encoder_hw: tuple[int, int]  # DINOv2 input
    vae_hw: tuple[int, int]
    vae_frames: int
    vae_config: dict  # AutoencoderKLWan's arguments beyond its defaults (the WAN2.1 VAE)


PAPER_SIZES = Sizes(PAPER, DiTConfig(), Stage1Config.sized("paper"), 8, 35, (448, 784), (432, 768), 25, {})
SMOKE_GEOMETRY = Geometry(vae_input_hw=(64, 128), dino_input_hw=(56, 112), feature_dim=128, num_pca_channels=32)
SMOKE_SIZES = Sizes(
    SMOKE_GEOMETRY,
    DiTConfig(num_layers=2, num_heads=2, dim=48, adaln_lora_rank=8, num_pca_channels=32),
    Stage1Config(num_pca_channels=32, feature_hw=(4, 8), dim=48, num_layers=2, num_heads=2, dropout=0.1),
    2,
    2,
    (56, 112),
    (32, 64),
    5,
    {"base_dim": 4, "num_res_blocks": 1},  # pipeline/encoders/vae.py's tiny WAN
)


# ---- measuring ------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    """Peak GPU memory allocated since reset_peak; None on CPU (the memory check measures RSS there)."""
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def timed(fn, device, repeat: int = 1) -> float:
    """Seconds per call of fn after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def amp(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ---- the training steps ---------------------------------------------------------------------------
def dit_batch(cfg: DiTConfig, geometry: Geometry, micro: int, device) -> dict:
    h, w = geometry.latent_hw
    fh, fw = geometry.feature_hw
    gen = torch.Generator(device).manual_seed(0)
    return {
        "latents": torch.randn(micro, 16, geometry.latent_frames, h, w, device=device, generator=gen),
        "features": torch.randn(
            micro, geometry.latent_frames, fh, fw, cfg.num_pca_channels, device=device, generator=gen
        ),
    }


def dit_loss(model, batch: dict, geometry: Geometry) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return diffusion.training_loss(model, batch["latents"], batch["features"], geometry.context_latents, gen)[0]


def stage1_batch(cfg: Stage1Config, micro: int, device) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(0)
    return torch.randn(micro, cfg.num_frames, *cfg.feature_hw, cfg.num_pca_channels, device=device, generator=gen)


def stage1_step_loss(model, window: torch.Tensor) -> torch.Tensor:
    return stage1_loss(model(window[:, :-1]), window[:, -1])


class Trainer:
    """A model with Adam (its moments allocated up front) and an EMA copy: the states a rank holds."""

    def __init__(self, model: torch.nn.Module, device, ema: bool = True):
        self.model = model.to(device).train()
        self.ema = [p.detach().clone() for p in self.model.parameters()] if ema else []
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5)
        for p in self.model.parameters():  # Adam's moments and the gradients exist from here on
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.device = device

    def step(self, loss_fn) -> torch.Tensor:
        """One optimizer step of one micro-batch; gradients are kept (accumulation's worst case)."""
        with amp(self.device):
            loss = loss_fn(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.ema:
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1e-4)
        return loss.detach()


def estimate_for(kind: str, cfg, geometry: Geometry, device, micro: int) -> float:
    bf16 = device.type == "cuda"
    if kind == "dit":
        fp = dit_footprint(cfg, geometry, ema=True, bf16=bf16)
    else:
        fp = stage1_footprint(cfg, ema=True, bf16=bf16)
    fp = replace(fp, inputs=0)  # the check's batch is made on the device, not copied there
    return fp.total(micro, cfg.gradient_checkpointing) / GiB


def measure_step(kind: str, cfg, geometry: Geometry, micro: int, device) -> dict:
    """Peak memory of one training step (weights, grads, Adam, EMA, activations) against the estimate.
    GPU: the allocator's peak; CPU: the growth of the process' peak RSS (run in a fresh process)."""
    torch.manual_seed(0)
    if kind == "dit":
        batch = dit_batch(cfg, geometry, micro, device)
        build, loss_fn = lambda: Re2PixDiT(cfg), lambda m: dit_loss(m, batch, geometry)
    else:
        window = stage1_batch(cfg, micro, device)
        build, loss_fn = lambda: MaskedFeatureTransformer(cfg), lambda m: stage1_step_loss(m, window)
    reset_peak(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer = Trainer(build(), device)
    t0 = time.perf_counter()
    trainer.step(loss_fn)
    sync(device)
    t = time.perf_counter() - t0
    if device.type == "cuda":
        measured = peak_gib(device)
    else:
        measured = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / GiB
    estimated = estimate_for(kind, cfg, geometry, device, micro)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {
        "model": kind,
        "parameters": params,
        "blocks": cfg.num_layers,
        "micro_batch": micro,
        "checkpointing": cfg.gradient_checkpointing,
        "step_s": round(t, 3),
        "measured_gib": round(measured, 3),
        "estimated_gib": round(estimated, 3),
        "error": round(estimated / measured - 1, 3),
    }


# ---- the checks -------------------------------------------------------------------------------------
def check_to_device(sizes: Sizes, device) -> dict:
    """A Stage 2 batch of channel-blocked float16 features [B, F, H, W, nb, k] from pinned memory."""
    g = sizes.geometry
    nb, k = 9, g.num_pca_channels // 9 or 1
    feats = torch.randn(8, g.latent_frames, *g.feature_hw, nb, k).half()
    batch = {"features": feats.pin_memory() if device.type == "cuda" else feats}
    seconds = timed(lambda: to_device(batch, device), device, repeat=5)
    return {"gb_per_s": round(feats.numel() * 2 / seconds / 1e9, 2), "batch_mb": round(feats.numel() * 2 / 1e6, 1)}


def dit_step_figures(sizes: Sizes, device, micro: int, checkpointing: bool) -> dict:
    cfg = replace(sizes.dit, gradient_checkpointing=checkpointing)
    batch = dit_batch(cfg, sizes.geometry, micro, device)
    trainer = Trainer(Re2PixDiT(cfg), device)
    reset_peak(device)
    t = timed(lambda: trainer.step(lambda m: dit_loss(m, batch, sizes.geometry)), device, repeat=2)
    fp = dit_footprint(cfg, sizes.geometry, ema=True, bf16=device.type == "cuda")
    flops = micro * fp.flops * (4 / 3 if checkpointing else 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    out = {"micro_batch": micro, "checkpointing": checkpointing, "steps_per_s": round(1 / t, 3)}
    out["mfu"] = round(flops / t / peak, 3) if peak else None
    out["peak_gib"] = peak_gib(device)
    out["estimated_gib"] = round(estimate_for("dit", cfg, sizes.geometry, device, micro), 2)
    return out


def check_dit_step(sizes: Sizes, device) -> dict:
    """The paper DiT's training step at micro-batch 1 and 2; activation memory per clip = the peak's growth
    from 1 to 2 clips (GPU only)."""
    runs = [dit_step_figures(sizes, device, m, c) for c in (False, True) for m in (1, 2)]
    out = {"runs": runs}
    if device.type == "cuda":
        for c, name in ((False, "activation_gib_per_clip"), (True, "activation_gib_per_clip_checkpointed")):
            one, two = (r["peak_gib"] for r in runs if r["checkpointing"] == c)
            out[name] = round(two - one, 2)
    return out


def check_host_syncs(sizes: Sizes, device) -> dict:
    """Synchronizing CUDA calls in one DiT training step (torch.cuda.set_sync_debug_mode)."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA (CPU has no host sync to count)"}
    batch = dit_batch(sizes.dit, sizes.geometry, 1, device)
    trainer = Trainer(Re2PixDiT(sizes.dit), device)
    trainer.step(lambda m: dit_loss(m, batch, sizes.geometry))
    sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.step(lambda m: dit_loss(m, batch, sizes.geometry))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"syncs_per_step": len(syncs), "first": syncs[:3]}


def check_stage1_step(sizes: Sizes, device) -> dict:
    return {"runs": [stage1_step_figures(sizes, device, checkpointing) for checkpointing in (False, True)]}


def stage1_step_figures(sizes: Sizes, device, checkpointing: bool) -> dict:
    cfg = replace(sizes.stage1, gradient_checkpointing=checkpointing)
    window = stage1_batch(cfg, sizes.windows, device)
    trainer = Trainer(MaskedFeatureTransformer(cfg), device, ema=False)
    reset_peak(device)
    t = timed(lambda: trainer.step(lambda m: stage1_step_loss(m, window)), device, repeat=2)
    out = {"windows": sizes.windows, "checkpointing": checkpointing, "steps_per_s": round(1 / t, 3)}
    out["peak_gib"] = peak_gib(device)
    return out


def check_ddp(sizes: Sizes, device) -> dict:
    """One rank's DDP step (DDP first, then compile in training): NCCL on GPU, gloo on CPU."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        cfg = replace(sizes.dit, num_layers=1)
        batch = dit_batch(cfg, sizes.geometry, 1, device)
        model = Re2PixDiT(cfg).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp(device):
                loss = dit_loss(ddp, batch, sizes.geometry)
            loss.backward()
            opt.step()

        return {"backend": backend, "step_s": round(timed(step, device, repeat=2), 3)}
    finally:
        dist.destroy_process_group()


def check_sampler(sizes: Sizes, device) -> dict:
    """Seconds per network evaluation of the Heun sampler in bf16 and fp32 (update arithmetic in fp32),
    and the bf16 sample's relative error against fp32 from the same noise (a random DiT)."""
    g = sizes.geometry
    torch.manual_seed(0)
    model = Re2PixDiT(sizes.dit).to(device).eval()
    with torch.no_grad():  # a random DiT starts as F = 0: give every layer weights so the sample depends on them
        for p in model.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    h, w = g.latent_hw
    ctx = torch.randn(1, 16, g.context_latents, h, w, device=device)
    feats = torch.randn(1, g.latent_frames, *g.feature_hw, sizes.dit.num_pca_channels, device=device)
    noise = torch.randn(1, 16, g.future_latents, h, w, device=device)
    evals = 2 * sizes.sampler_steps - 1
    out, seconds = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        net = autocast_network(model, dtype, device)

        def run(net=net, name=name):
            with torch.no_grad():
                out[name] = diffusion.sample(
                    net, ctx, feats, num_steps=sizes.sampler_steps, num_future=g.future_latents, initial_noise=noise
                )

        seconds[name] = timed(run, device)
    fut = g.context_latents
    err = (out["bf16"][:, :, fut:] - out["fp32"][:, :, fut:]).norm() / out["fp32"][:, :, fut:].norm()
    return {
        "evaluations": evals,
        "s_per_eval_fp32": round(seconds["fp32"] / evals, 4),
        "s_per_eval_bf16": round(seconds["bf16"] / evals, 4),
        "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 2),
        "bf16_rel_error": round(err.item(), 5),
    }


def encoder_error(encode, x, device) -> dict:
    """Encode rate and the bf16 output's relative error against fp32."""
    with torch.inference_mode():
        t32 = timed(lambda: encode(x), device)
        ref = encode(x).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t16 = timed(lambda: encode(x), device)
            low = encode(x).float()
    return {
        "s_fp32": round(t32, 3),
        "s_bf16": round(t16, 3),
        "bf16_rel_error": round(((low - ref).norm() / ref.norm()).item(), 5),
    }


def check_dinov2(sizes: Sizes, device) -> dict:
    """Real-size DINOv2-Reg ViT-B/14 (random weights from its library config) on one batch of frames."""
    try:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    except ImportError as e:
        return {"skipped": f"transformers is not importable ({e})"}
    torch.manual_seed(0)
    # facebook/dinov2-with-registers-base: ViT-B/14 (the library's default patch is 16)
    config = Dinov2WithRegistersConfig(image_size=518, patch_size=14, num_register_tokens=4)
    model = Dinov2WithRegistersModel(config).to(device).eval()
    frames = 7
    x = torch.randn(frames, 3, *sizes.encoder_hw, device=device)
    out = encoder_error(lambda v: model(pixel_values=v).last_hidden_state, x, device)
    out["frames_per_s_bf16"] = round(frames / out["s_bf16"], 2)
    return out


def check_vae(sizes: Sizes, device) -> dict:
    """The WAN2.1 VAE's architecture (diffusers AutoencoderKLWan defaults, random weights) on one clip:
    the posterior mean in bf16 vs fp32 (the cache job's choice, pipeline/encoders/registry.py)."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        return {"skipped": f"diffusers is not importable ({e})"}
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**sizes.vae_config).to(device).eval()
    x = torch.rand(1, 3, sizes.vae_frames, *sizes.vae_hw, device=device) * 2 - 1
    out = encoder_error(lambda v: vae.encode(v).latent_dist.mean, x, device)
    out["clips_per_s_bf16"] = round(1 / out["s_bf16"], 3)
    out["input"] = [sizes.vae_frames, *sizes.vae_hw]
    return out


def check_compile(sizes: Sizes, device) -> dict:
    """torch.compile's gain on the DiT training step (2 blocks; compile time reported apart)."""
    cfg = replace(sizes.dit, num_layers=min(sizes.dit.num_layers, 2))
    batch = dit_batch(cfg, sizes.geometry, 1, device)
    trainer = Trainer(Re2PixDiT(cfg), device, ema=False)
    eager = timed(lambda: trainer.step(lambda m: dit_loss(m, batch, sizes.geometry)), device, repeat=2)
    compiled = torch.compile(trainer.model)
    t0 = time.perf_counter()
    trainer.step(lambda m: dit_loss(compiled, batch, sizes.geometry))
    sync(device)
    compile_s = time.perf_counter() - t0
    fast = timed(lambda: trainer.step(lambda m: dit_loss(compiled, batch, sizes.geometry)), device, repeat=2)
    return {
        "eager_s": round(eager, 4),
        "compiled_s": round(fast, 4),
        "gain": round(eager / fast, 3),
        "compile_s": round(compile_s, 1),
    }


CHECKS = {
    "to_device": check_to_device,
    "dit_step": check_dit_step,
    "host_syncs": check_host_syncs,
    "stage1_step": check_stage1_step,
    "ddp": check_ddp,
    "sampler": check_sampler,
    "dinov2": check_dinov2,
    "vae": check_vae,
    "compile": check_compile,
}


def run_check(name: str, fn, sizes: Sizes, device) -> dict:
    t0 = time.perf_counter()
    reset_peak(device)
    try:
        record = {"check": name, "ok": True, **fn(sizes, device)}
    except Exception as e:  # noqa: BLE001 -- a failing check is reported, the others still run
        record = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
        record["where"] = traceback.format_exc().strip().splitlines()[-3:]
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record.setdefault("peak_gib", round(peak_gib(device), 2) if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# ---- the memory table: one fresh process per step (CPU peak RSS is a process' high-water mark) ----
def memory_table(sizes: Sizes, device, configs: list[dict]) -> list[dict]:
    rows = []
    for spec in configs:
        if device.type == "cuda":
            rows.append(step_memory(spec, sizes, device))
            continue
        cmd = [
            sys.executable,
            __file__,
            "--step-memory",
            json.dumps(spec),
            "--cpu-smoke" if sizes is SMOKE_SIZES else "--paper",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"spec": spec, "error": done.stderr.strip()[-400:]})
    return rows


def step_memory(spec: dict, sizes: Sizes, device) -> dict:
    """spec: {"model": "dit" | "stage1", "blocks", "checkpointing", "grid": [h, w] latent (dit) or feature
    grid (stage1), "micro"}: the paper's widths at that depth and grid."""
    ckpt = bool(spec.get("checkpointing"))
    grid = spec.get("grid")
    if spec["model"] == "dit":
        geometry = sizes.geometry
        if grid:
            h, w = grid
            geometry = replace(
                sizes.geometry, vae_input_hw=(8 * h, 8 * w), dino_input_hw=(14 * (h // 2), 14 * (w // 2))
            )
        cfg = replace(sizes.dit, num_layers=spec["blocks"], gradient_checkpointing=ckpt)
    else:
        geometry = sizes.geometry
        cfg = replace(sizes.stage1, num_layers=spec["blocks"], gradient_checkpointing=ckpt)
        if grid:
            cfg = replace(cfg, feature_hw=tuple(grid))
    return measure_step(spec["model"], cfg, geometry, spec.get("micro", 1), device)


SMOKE_MEMORY = [{"model": "dit", "blocks": 2}, {"model": "stage1", "blocks": 2, "checkpointing": True}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--paper", action="store_true", help="the paper's sizes even without CUDA (slow on a CPU)")
    p.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    p.add_argument("--memory", default="", help="JSON list of step specs for the memory table (see step_memory)")
    p.add_argument("--step-memory", default="", help=argparse.SUPPRESS)  # one spec, in a fresh process
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    sizes = PAPER_SIZES if (device.type == "cuda" or args.paper) and not args.cpu_smoke else SMOKE_SIZES
    if device.type == "cuda":
        fast_math()
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.step_memory:
        print(json.dumps(step_memory(json.loads(args.step_memory), sizes, device)), flush=True)
        return 0
    mode = "gpu" if device.type == "cuda" else "cpu-smoke" if sizes is SMOKE_SIZES else "cpu-paper"
    header = {"check": "device", "mode": mode, "torch": torch.__version__}
    if device.type == "cuda":
        header["name"] = torch.cuda.get_device_name(device)
    print(json.dumps(header), flush=True)
    names = [n for n in args.only.split(",") if n] or ["memory", *CHECKS]
    specs = json.loads(args.memory) if args.memory else (SMOKE_MEMORY if sizes is SMOKE_SIZES else [
        {"model": "dit", "blocks": 14, "micro": 1},
        {"model": "dit", "blocks": 14, "micro": 1, "checkpointing": True},
    ])  # fmt: skip
    failed = 0
    for name in names:
        if name == "memory":
            record = run_check("memory", lambda s, d: {"rows": memory_table(s, d, specs)}, sizes, device)
        elif name in CHECKS:
            record = run_check(name, CHECKS[name], sizes, device)
        else:
            record = {"check": name, "ok": False, "error": f"no such check; known: memory, {', '.join(CHECKS)}"}
        failed += not record["ok"]
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
