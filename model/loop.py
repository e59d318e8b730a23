"""The training loop shared by Stage 1, Stage 2 and the Baseline: plain PyTorch.

A `Task` says what is trained (build the model, compute the loss of a batch, evaluate); `train`
does the rest: DDP under `torchrun` (NCCL on GPU, gloo on CPU), bf16 autocast on GPU, gradient
accumulation, Adam with warmup then cosine or linear decay, gradient clipping, EMA, torch.compile,
checkpoints (model/checkpoint.py), a tqdm bar, a JSONL metrics file and TensorBoard when installed.
Each train record holds the data budget: data_wait_s (seconds per step spent waiting for batches)
and data_share (of the wall time), and the clips skipped as damaged so far (skipped_clips).

Exact resume: every source of randomness is a function of (seed, step): the data order comes from
the stream's position, and before each micro-batch the global torch RNG and the task's generator
are seeded from (seed, step, micro-batch, rank). With the optimizer, scheduler, EMA and weights
restored, a resumed run computes the same losses as an uninterrupted one (from Zarr stores).

No host sync between log lines: the task's generator lives on the training device, so sigma, noise,
masks and dropout draws are made there (no copy from pageable memory), the tasks mask with torch.where
(never boolean indexing), the step's loss stays a device tensor until a log line reduces it, and a
background thread moves the next batch to the device while the step runs (DeviceBatches). Checkpoints
are snapshotted to host memory and written by a background thread (model/checkpoint.py, AsyncSaver).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, Re2pixError

from .checkpoint import (
    AsyncSaver,
    CheckpointError,
    check_feature_space,
    check_run_dir,
    feature_space,
    find_resumable,
    has_checkpoints,
    latest_checkpoint,
    load_state,
    load_weights,
    read_meta,
)
from .data import ClipStream
from .metrics import Means
from .runtime import Runtime, autocast, init_runtime, to_device

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
    tensorboard: bool = False  # metrics.jsonl's records as TensorBoard scalars too (the tensorboard extra)
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

    def saved_config(self, saved: dict) -> dict: ...  # a checkpoint's model_config in this code's names

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor | tuple: ...

    # the loss, or (loss, {name: scalar tensor}) for terms logged beside it (REPA's alignment terms)

    def evaluate(self, model: nn.Module, batches: Iterable[dict], generator: torch.Generator) -> Means: ...


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


# ---- logs ------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl in the run dir (rank 0), the source of truth, and with `tensorboard` the same numbers as
    TensorBoard scalars under run_dir/tensorboard."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: forget what came after the checkpoint
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

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
    """Every record of a stage's metrics.jsonl (run_dir: the stage folder, e.g. runs/demo/train/stage1), [] when
    it has none yet. No job reads it back: it is for users inspecting a run (a notebook, a plot script)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- the pieces of a run -----------------------------------------------------------------------------
@dataclass
class Trainee:
    """What a checkpoint holds besides the data position: the model, its EMA, the optimizer and the
    LR schedule; `net` is the model as trained (compiled, DDP-wrapped)."""

    model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    net: nn.Module | None = None

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


def build(task: Task, cfg: LoopConfig, runtime: Runtime) -> Trainee:
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return Trainee(
        model,
        EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg)),
    )


def resume_point(run_dir: Path, resume: bool, strict: bool, runtime: Runtime) -> Path | None:
    """The checkpoint this run continues from (None: a fresh run): the newest intact one (a damaged
    one is skipped with a warning, or stops the run when strict); the one place that chooses it."""
    if has_checkpoints(run_dir) and not resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another --run-dir"
        )
    ckpt, skipped = find_resumable(run_dir, strict) if resume else (None, [])
    for _, reason in skipped if runtime.is_main else ():
        log.warning("skipping a damaged checkpoint, resuming from the one before it: %s", reason)
    return ckpt


def restore(ckpt: Path, task: Task, trainee: Trainee, stream: ClipStream, device: torch.device) -> tuple[int, dict]:
    """Load a checkpoint into the trainee and the stream; (its step, the summary it recorded)."""
    meta = read_meta(ckpt)
    try:  # keys renamed since the checkpoint was saved are mapped; an unknown one is a mismatch
        saved = task.saved_config(meta.get("model_config") or {})
    except ConfigError:
        saved = meta.get("model_config")
    if meta.get("task") != task.name or _weights_config(saved) != _weights_config(task.model_config()):
        raise CheckpointError(
            f"{ckpt} holds a {meta.get('task')} model with config {meta.get('model_config')}; "
            f"this run builds {task.name} {task.model_config()}: use another --run-dir"
        )
    check_feature_space(meta, ckpt, ", ".join(stream.sources), stream.manifest)
    trainee.model.load_state_dict(load_weights(ckpt, "model", device))
    if trainee.ema is not None:
        trainee.ema.model.load_state_dict(load_weights(ckpt, "ema", device))
    state = load_state(ckpt)
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    return int(state["step"]), state.get("summary", {})


def _weights_config(config):
    """A model config without gradient_checkpointing: recomputing activations changes memory, not the
    weights, so the fit plan (model/memory.py) may turn it on or off between a run and its resume."""
    if isinstance(config, dict):
        return {k: _weights_config(v) for k, v in config.items() if k != "gradient_checkpointing"}
    return config


def wrap(model: nn.Module, cfg: LoopConfig, runtime: Runtime) -> nn.Module:
    """DDP first, then torch.compile: compiling the DDP module lets the compiler split the graph at
    DDP's gradient buckets so each all-reduce overlaps the rest of the backward (compiling the bare
    model and wrapping it afterwards runs every all-reduce after the compiled backward)."""
    net = model
    if runtime.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    return torch.compile(net) if cfg.compile else net


def train_step(
    task: Task, trainee: Trainee, batches: Iterator[dict], cfg: LoopConfig, runtime: Runtime, step: int
) -> tuple[torch.Tensor, dict, torch.Tensor, float]:
    """One optimizer step over cfg.grad_accum micro-batches: (mean loss, mean logged terms, gradient norm
    before clipping (0 without clipping), seconds spent waiting for batches)."""
    net = trainee.net
    trainee.optimizer.zero_grad(set_to_none=True)
    total, terms, waited = torch.zeros((), device=runtime.device), {}, 0.0
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)  # already on the device (DeviceBatches)
        waited += time.perf_counter() - t0
        seed = step_seed(cfg.seed, step, micro, runtime.rank)
        torch.manual_seed(seed)  # dropout and any other draw from the global RNG
        last = micro == cfg.grad_accum - 1 or not runtime.distributed  # DDP: reduce on the last only
        with contextlib.nullcontext() if last else net.no_sync():
            with autocast(runtime, cfg.amp):
                loss = task.loss(net, batch, torch.Generator(device=runtime.device).manual_seed(seed))
            loss, logged = loss if isinstance(loss, tuple) else (loss, {})
            (loss / cfg.grad_accum).backward()
        total += loss.detach().float() / cfg.grad_accum
        for name, value in logged.items():
            terms[name] = terms.get(name, 0) + value.detach().float() / cfg.grad_accum
    grad_norm = (
        nn.utils.clip_grad_norm_(trainee.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
    )
    trainee.optimizer.step()
    trainee.scheduler.step()
    if trainee.ema is not None:
        trainee.ema.update(trainee.model)
    return total, terms, grad_norm, waited


def evaluate(
    task: Task, model: nn.Module, make_val: Callable[[], Iterable[dict]] | None, runtime: Runtime, cfg: LoopConfig
) -> dict[str, float]:
    if make_val is None:
        return {}
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=runtime.device).manual_seed(step_seed(cfg.seed, 0, 0, runtime.rank, purpose=1))
    batches = (to_device(b, runtime.device) for b in make_val())
    with torch.no_grad(), autocast(runtime, cfg.amp):
        means = task.evaluate(model, batches, gen)
    means.all_reduce()
    model.train(was_training)
    return means.compute()


class DivergedError(Re2pixError):
    """The loss or the gradient norm went NaN/Inf: the run stops before it saves such weights."""


class Divergence:
    """Watches each step's loss and gradient norm for NaN/Inf without a device sync per step: the values stay
    on the device, with the ids of the clips the step read, until `check` (before a log line or a checkpoint)
    looks at them all at once and names the first step that went non-finite and its batch."""

    def __init__(self, batches: Iterator[dict]):
        self.pending: list[tuple[int, torch.Tensor, list[str]]] = []  # (step, [loss, grad norm], clip ids)
        self._ids: list[str] = []
        self.batches = self._recording(batches)

    def _recording(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self._ids.extend(batch.get("clip_id", []))
            yield batch

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)])
        self.pending.append((step, values, self._ids))
        self._ids = []

    def check(self, task: Task, runtime: Runtime, sources, run_dir: Path) -> None:
        """Raise DivergedError (on every rank alike) when a step since the last check went non-finite."""
        if not self.pending:
            return
        values = torch.stack([v for _, v, _ in self.pending]).cpu()  # the one sync
        bad = (~values.isfinite()).any(dim=1).nonzero().flatten().tolist()
        first = self.pending[bad[0]] if bad else None
        self.pending = []
        if not runtime.mean({"bad": float(first is not None)})["bad"]:
            return
        if first is None:
            where = "on another rank's batch"
        else:
            step, (loss, norm), ids = first[0], first[1].tolist(), first[2]
            shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            where = f"at step {step + 1} (loss {loss}, gradient norm {norm}) on the batch of clips {shown}"
        saved = latest_checkpoint(run_dir)
        kept = f"the last checkpoint is {saved}" if saved else "no checkpoint was saved"
        raise DivergedError(
            f"{task.name}: training went NaN/Inf {where} of {', '.join(sources)}; nothing after is saved "
            f"({kept}): check those clips (`python -m jobs.store verify STORE`) or lower the learning rate"
        )


class Window:
    """Steps, clips and data-wait time since the last log line: the rate and the data budget."""

    def __init__(self, clips_per_step: int):
        self.clips_per_step = clips_per_step
        self.start, self.steps, self.waited = time.perf_counter(), 0, 0.0

    def add(self, waited: float) -> None:
        self.steps += 1
        self.waited += waited

    def close(self) -> dict[str, float]:
        """clips_per_s, data_wait_s (per step, this rank) and data_share (of the wall time); restarts."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "clips_per_s": self.steps * self.clips_per_step / seconds,
            "data_wait_s": self.waited / max(self.steps, 1),
            "data_share": self.waited / seconds,
        }
        self.__init__(self.clips_per_step)
        return out


class DeviceBatches:
    """A stream's batches moved to the device by a background thread, `ahead` batches in advance: the
    host work of a batch (waiting for it, pinning, float16 -> float32 on a CPU) leaves the main thread,
    and on a GPU its copies are queued on the device's stream ahead of the step that reads them (the
    same stream: ordered without events). The stream's own position runs ahead of the step, so this
    object stands in for it where the loop records positions: `position`, `skipped` and state_dict()
    are those after the batch handed out last. A reading error is raised here, at the batch it hit."""

    _END = object()

    def __init__(self, stream: ClipStream, batches: Iterator[dict], device: torch.device, ahead: int = 1):
        self._state = stream.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        args = (stream, batches, device, self._queue, self._stop)
        self._thread = threading.Thread(target=_move_batches, args=args, name="device-batches", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    @property
    def position(self) -> tuple[int, int]:
        return self._state["epoch"], self._state["batch"]

    @property
    def skipped(self) -> int:
        return self._state["skipped"]

    def state_dict(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _move_batches(stream, batches, device, out: queue.Queue, stop: threading.Event) -> None:
    """DeviceBatches' thread: (batch on the device, stream state after it) into `out` until stopped."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in batches:
            if not put((to_device(batch, device), stream.state_dict())):
                return
        put(DeviceBatches._END)
    except BaseException as e:  # handed to the main thread, which raises it
        put(e)
    finally:
        batches.close()  # stops the DataLoader workers, from the thread that iterated them


# ---- the loop ----------------------------------------------------------------------------------------
def train_record(done, loss, terms, grad_norm, trainee, stream, window, runtime, cfg) -> dict:
    """One metrics.jsonl line of training: the window's means over every rank, and its data budget."""
    means = runtime.mean({**terms, "loss": loss, "grad_norm": grad_norm, "skipped": stream.skipped})
    record = {
        "kind": "train",
        "step": done,
        "loss": means["loss"],
        "lr": trainee.scheduler.get_last_lr()[0],
        "epoch": stream.position[0],
        "skipped_clips": round(means["skipped"] * runtime.world),
        **{k: means[k] for k in terms},
        **window.close(),
    }
    if cfg.grad_clip > 0:
        record["grad_norm"] = means["grad_norm"]
    return record


def train(
    task: Task,
    cfg: LoopConfig,
    stream: ClipStream,
    run_dir,
    *,
    runtime: Runtime | None = None,
    make_val: Callable[[], Iterable[dict]] | None = None,
    resume: bool = False,
    workers: int = 0,
    prefetch_factor: int = 2,
) -> dict:
    """Train `task` for cfg.steps optimizer steps on `stream` (this rank's batches). Returns a summary:
    step, last loss, final evaluation, checkpoint path and weight fingerprint.

    resume: continue from the run dir's latest checkpoint (start fresh if there is none); without it a
    run dir holding checkpoints is refused. A finished run only reports what its checkpoint recorded.
    make_val: returns a fresh iterable of validation batches (this rank's share)."""
    runtime = runtime or init_runtime()
    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # never take over a folder that is not a run
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_point(run_dir, resume, cfg.strict_resume, runtime)
    trainee = build(task, cfg, runtime)
    start, summary = restore(ckpt, task, trainee, stream, runtime.device) if ckpt else (0, {})
    if ckpt and runtime.is_main:
        log.info("%s: resuming from %s (step %d)", task.name, ckpt, start)
    trainee.net = wrap(trainee.model, cfg, runtime)
    n_params = sum(p.numel() for p in trainee.model.parameters())
    clips_per_step = stream.batch_size * runtime.world * cfg.grad_accum
    meta = {
        "task": task.name,
        "model_config": task.model_config(),
        "parameters": n_params,
        "loop": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "config": cfg.extra,
        "data": stream.describe(),
        "feature_space": feature_space(stream.manifest, stream.channels),
    }
    metrics = MetricsLog(run_dir, start, runtime.is_main, cfg.tensorboard)
    if runtime.is_main:
        log.info("%s: %s parameters, %d clips per step (%d per rank x %d ranks x %d accumulated), data %s",
                 task.name, f"{n_params:,}", clips_per_step, stream.batch_size, runtime.world, cfg.grad_accum,
                 json.dumps(stream.describe()))  # fmt: skip
    show = cfg.progress and runtime.is_main
    bar = tqdm(total=cfg.steps, initial=start, desc=task.name, unit="step", dynamic_ncols=True, disable=not show)
    read = stream.batches(workers, prefetch_factor, pin_memory=runtime.device.type == "cuda", reuse=True)
    batches = DeviceBatches(stream, read, runtime.device)
    divergence = Divergence(batches)
    trainee.net.train()
    window = Window(clips_per_step)
    saver = AsyncSaver()
    try:
        for step in range(start, cfg.steps):
            loss, terms, grad_norm, waited = train_step(task, trainee, divergence.batches, cfg, runtime, step)
            divergence.add(step, loss, grad_norm)
            done = step + 1
            window.add(waited)
            bar.update(1)
            logs, saves = (
                done % cfg.log_every == 0 or done == cfg.steps,
                done % cfg.ckpt_every == 0 or done == cfg.steps,
            )
            if logs or saves:
                divergence.check(task, runtime, stream.sources, run_dir)
            if logs:
                record = train_record(done, loss, terms, grad_norm, trainee, batches, window, runtime, cfg)
                metrics.write(record)
                summary["loss"] = record["loss"]
                bar.set_postfix(
                    loss=f"{record['loss']:.4g}",
                    clips_s=f"{record['clips_per_s']:.1f}",
                    data=f"{100 * record['data_share']:.0f}%",
                )
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                summary["eval"] = evaluate(task, trainee.evaluated, make_val, runtime, cfg)
                if summary["eval"]:
                    metrics.write({"kind": "eval", "step": done, **summary["eval"]})
                    if runtime.is_main:
                        log.info("%s step %d eval: %s", task.name, done, _short(summary["eval"]))
            if saves:
                save(saver, run_dir, done, trainee, batches, meta, summary, cfg, runtime)
    except BaseException:  # a stopped run: its workers stop, and its checkpoint in flight is finished whole
        batches.close()
        saver.wait(raise_error=False)  # the stop is what the user sees
        raise
    bar.close()
    batches.close()  # stops the DataLoader workers
    metrics.close()
    saver.wait()  # the last checkpoint is on disk (or its failure raised) before the run reports it
    runtime.barrier()
    final = latest_checkpoint(run_dir)
    return {
        "task": task.name,
        "step": cfg.steps,
        "loss": summary.get("loss", float("nan")),
        "eval": summary.get("eval", {}),
        "checkpoint": str(final) if final else None,
        "fingerprint": read_meta(final)["fingerprint"] if final else None,
    }


def save(
    saver: AsyncSaver,
    run_dir: Path,
    step: int,
    trainee: Trainee,
    stream: ClipStream,
    meta: dict,
    summary: dict,
    cfg: LoopConfig,
    runtime: Runtime,
) -> None:
    """A checkpoint at `step`: rank 0 snapshots it to host memory and `saver` writes it in the background
    while training goes on; every rank waits for the snapshot. Weights holding NaN/Inf are never saved: every
    rank refuses alike (DDP keeps their weights equal)."""
    weights = [*trainee.model.parameters(), *(trainee.ema.model.parameters() if trainee.ema else ())]
    if not torch.stack([w.isfinite().all() for w in weights]).all():
        raise DivergedError(f"{meta['task']}: the weights hold NaN/Inf at step {step}: not saved as a checkpoint")
    if runtime.is_main:
        state = {
            "optimizer": trainee.optimizer.state_dict(),
            "scheduler": trainee.scheduler.state_dict(),
            "data": stream.state_dict(),
            "summary": summary,
        }
        saver.save(
            run_dir,
            step,
            model=trainee.model,
            ema=trainee.ema.model if trainee.ema else None,
            state=state,
            meta=meta,
            keep=cfg.keep_checkpoints,
        )
    runtime.barrier()


def _short(values: dict, n: int = 12) -> str:
    keys = [k for k in values if "/" not in k][:n]
    return ", ".join(f"{k}={values[k]:.4g}" for k in keys)
