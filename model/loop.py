"""The training loop shared by Stage 1, Stage 2 and the Baseline: plain PyTorch.

A `Task` says what is trained (build the model, compute the loss of a batch, evaluate); `train`
does the rest: DDP under `torchrun` (NCCL on GPU, gloo on CPU), bf16 autocast on GPU, gradient
accumulation, Adam with warmup then cosine or linear decay, gradient clipping, EMA, torch.compile,
checkpoints (model/checkpoint.py), a tqdm bar, a JSONL metrics file and TensorBoard when installed.

Exact resume: every source of randomness is a function of (seed, step): the data order comes from
the stream's position, and before each micro-batch the global torch RNG and the task's generator
are seeded from (seed, step, micro-batch, rank). With the optimizer, scheduler, EMA and weights
restored, a resumed run computes the same losses as an uninterrupted one (from Zarr stores).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (
    check_run_dir,
    find_resumable,
    has_checkpoints,
    latest_checkpoint,
    load_state,
    load_weights,
    read_meta,
    save_checkpoint,
)
from .data import ClipStream, make_loader
from .metrics import Means

log = logging.getLogger("re2pix.train")

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class LoopConfig:
    steps: int
    lr: float
    schedule: str = "cosine"  # after warmup: cosine or linear decay to final_lr_ratio * lr, or constant
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # 0 turns EMA off
    compile: bool = False
    amp: bool = True  # bf16 autocast on GPU (never on CPU)
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    strict_resume: bool = False  # a damaged latest checkpoint stops the run instead of falling back
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in checkpoints (the job's own config)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("steps and grad_accum must be >= 1 and warmup_steps >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self.betas = tuple(self.betas)


class Task(Protocol):
    """What a stage trains. `loss` and `evaluate` get batches already on the device."""

    name: str

    def build_model(self) -> nn.Module: ...

    def model_config(self) -> dict: ...

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, model: nn.Module, batches: Iterable[dict], generator: torch.Generator) -> Means: ...


# ---- runtime ---------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    if dist.is_initialized():
        return Runtime(dev, dist.get_rank(), dist.get_world_size(), local)
    return Runtime(dev)


def step_seed(seed: int, step: int, micro: int, rank: int, purpose: int = 0) -> int:
    """The seed of one micro-batch's draws (purpose 0: training, 1: evaluation)."""
    return int(np.random.SeedSequence([seed, purpose, step, micro, rank]).generate_state(1)[0])


def lr_factor(cfg: LoopConfig) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step s: linear warmup over warmup_steps, then decay."""
    def factor(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (s - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * shape
    return factor


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        import copy
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch to the device; stored float16 arrays become float32 there."""
    def move(v):
        v = v.to(device, non_blocking=True)
        return v.float() if v.is_floating_point() else v
    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(runtime: Runtime, enabled: bool):
    if enabled and runtime.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- logs ------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl in the run dir (rank 0), and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: forget what came after the checkpoint
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- the loop --------------------------------------------------------------------------------------
def evaluate(task: Task, model: nn.Module, make_val: Callable[[], Iterable[dict]] | None, runtime: Runtime,
             cfg: LoopConfig) -> dict[str, float]:
    if make_val is None:
        return {}
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, 0, 0, runtime.rank, purpose=1))
    batches = (to_device(b, runtime.device) for b in make_val())
    with torch.no_grad(), autocast(runtime, cfg.amp):
        means = task.evaluate(model, batches, gen)
    means.all_reduce()
    model.train(was_training)
    return means.compute()


def train(task: Task, cfg: LoopConfig, stream: ClipStream, run_dir, *, runtime: Runtime | None = None,
          make_val: Callable[[], Iterable[dict]] | None = None, resume: bool = False, workers: int = 0,
          prefetch_factor: int = 2) -> dict:
    """Train `task` for cfg.steps optimizer steps on `stream` (this rank's batches). Returns a summary:
    step, last loss, final evaluation, checkpoint path and weight fingerprint.

    resume: continue from the run dir's latest checkpoint (start fresh if there is none); without it a
    run dir holding checkpoints is refused. make_val: returns a fresh iterable of validation batches
    (this rank's share)."""
    runtime = runtime or init_runtime()
    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # never take over a folder that is not a run
    run_dir.mkdir(parents=True, exist_ok=True)
    if has_checkpoints(run_dir) and not resume:
        raise SystemExit(f"{run_dir} already holds checkpoints: pass --resume to continue "
                         "that run, or choose another --run-dir")
    ckpt, skipped = find_resumable(run_dir, cfg.strict_resume) if resume else (None, [])
    for _, reason in skipped if runtime.is_main else ():
        log.warning("skipping a damaged checkpoint, resuming from the one before it: %s", reason)

    torch.manual_seed(cfg.seed)
    model = task.build_model().to(runtime.device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start = 0
    if ckpt is not None:
        meta = read_meta(ckpt)
        if meta.get("task") != task.name or meta.get("model_config") != task.model_config():
            raise SystemExit(f"{ckpt} holds a {meta.get('task')} model with config {meta.get('model_config')}; "
                             f"this run builds {task.name} {task.model_config()}: use another --run-dir")
        model.load_state_dict(load_weights(ckpt, "model", runtime.device))
        if ema is not None:
            ema.model.load_state_dict(load_weights(ckpt, "ema", runtime.device))
        state = load_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        start = int(state["step"])
        if runtime.is_main:
            log.info("%s: resuming from %s (step %d)", task.name, ckpt, start)

    net = torch.compile(model) if cfg.compile else model
    if runtime.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())
    global_batch = stream.batch_size * runtime.world * cfg.grad_accum
    metrics = MetricsLog(run_dir, start, runtime.is_main)
    if runtime.is_main:
        log.info("%s: %s parameters, %d clips per step (%d per rank x %d ranks x %d accumulated), data %s",
                 task.name, f"{n_params:,}", global_batch, stream.batch_size, runtime.world, cfg.grad_accum,
                 json.dumps(stream.describe()))

    meta = {"task": task.name, "model_config": task.model_config(), "parameters": n_params,
            "loop": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "config": cfg.extra,
            "data": stream.describe()}
    position = stream.position

    def save(step: int) -> Path:
        path = None
        if runtime.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data": {**stream.state_dict(), "epoch": position[0], "batch": position[1]}}
            path = save_checkpoint(run_dir, step, model=model, ema=ema.model if ema else None, state=state,
                                   meta=meta, keep=cfg.keep_checkpoints)
        runtime.barrier()
        return path

    loss_value, last_eval = float("nan"), {}
    bar = None
    if start < cfg.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=task.name, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and runtime.is_main))
        batches = iter(make_loader(stream, workers=workers, prefetch_factor=prefetch_factor,
                                   pin_memory=runtime.device.type == "cuda"))
        net.train()
        t_log, steps_since = time.perf_counter(), 0
        for step in range(start, cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=runtime.device)
            logs_sum: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                position = stream.advance(batch["epoch"], batch["batch"])
                batch = to_device(batch, runtime.device)
                seed = step_seed(cfg.seed, step, micro, runtime.rank)
                torch.manual_seed(seed)  # dropout and any other draw from the global RNG
                gen = torch.Generator().manual_seed(seed)
                sync = micro == cfg.grad_accum - 1 or not runtime.distributed  # DDP: reduce on the last only
                with contextlib.nullcontext() if sync else net.no_sync():
                    with autocast(runtime, cfg.amp):
                        loss, logs = task.loss(net, batch, gen)
                    (loss / cfg.grad_accum).backward()
                total += loss.detach().float() / cfg.grad_accum
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0) + v.detach().float().mean() / cfg.grad_accum
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                         else None)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            done = step + 1
            steps_since += 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = torch.stack([total, *logs_sum.values(),
                                      grad_norm.float() if grad_norm is not None else total.new_zeros(())])
                if runtime.distributed:
                    dist.all_reduce(values)
                    values /= runtime.world
                values = values.tolist()
                loss_value = values[0]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"{task.name}: loss is {loss_value} at step {done}")
                now = time.perf_counter()
                rate = steps_since * global_batch / max(now - t_log, 1e-9)
                t_log, steps_since = now, 0
                record = {"kind": "train", "step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                          "clips_per_s": rate, "epoch": position[0],
                          **{k: v for k, v in zip(logs_sum, values[1:-1])}}
                if grad_norm is not None:
                    record["grad_norm"] = values[-1]
                metrics.write(record)
                bar.set_postfix(loss=f"{loss_value:.4g}", clips_s=f"{rate:.1f}")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                last_eval = evaluate(task, ema.model if ema else model, make_val, runtime, cfg)
                metrics.write({"kind": "eval", "step": done, **last_eval})
                if runtime.is_main:
                    log.info("%s step %d eval: %s", task.name, done, _short(last_eval))
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(done)
        bar.close()
        del batches
    final = latest_checkpoint(run_dir)
    earlier = [r for r in read_metrics(run_dir) if r.get("step") == cfg.steps] if bar is None else []
    loss_value = next((r["loss"] for r in earlier if r.get("kind") == "train"), loss_value)
    last_eval = evaluate(task, ema.model if ema else model, make_val, runtime, cfg)  # every rank takes part
    if last_eval and not any(r.get("kind") == "eval" for r in earlier):
        metrics.write({"kind": "eval", "step": cfg.steps, **last_eval})
    metrics.close()
    summary = {"task": task.name, "step": cfg.steps, "loss": loss_value, "eval": last_eval,
               "checkpoint": str(final) if final else None,
               "fingerprint": read_meta(final)["fingerprint"] if final else None}
    if runtime.is_main:
        log.info("%s finished at step %d: %s", task.name, cfg.steps, _short(last_eval))
    return summary


def _short(values: dict, n: int = 12) -> str:
    keys = [k for k in values if "/" not in k][:n]
    return ", ".join(f"{k}={values[k]:.4g}" for k in keys)
