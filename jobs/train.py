"""Train Re2Pix from stores: `python -m jobs.train --preset tiny --stage 1 --store runs/demo/store.zarr`.

Stages: `1` (Stage 1 masked feature transformer; `--stage1 '{"diffusion": true}'` forecasts by sampling
a feature diffusion model instead, model/stage1_diffusion.py), `2` (Stage 2 semantic DiT; its mixed supervision
reads the rollouts in clips/pred_features), `baseline` (the same DiT without features, also
`--stage 2 --no-semantics`), `repa` / `videorepa` (the Baseline DiT plus REPA's or VideoREPA's alignment
loss to the stored features, model/repa.py; settings in the "stage2" object, its "align" key),
`all` (Stage 1 -> rollout of Stage 1 into every Zarr store -> Stage 2 -> Baseline). Each stage trains in
RUN_DIR/{stage1,stage2,baseline,repa,videorepa}; `--resume` continues every stage from its latest
checkpoint (a finished stage only reports its result) and makes `all` resumable as a whole. Baseline-Large
(28 DiT blocks, 1.55B) is `--preset paper_large` (its stage is `baseline`).
`--on-bad-clip skip` trains past clips whose chunks are missing or damaged (each is logged once and
counted as skipped_clips in metrics.jsonl); the default, stop, ends the run with one line naming the chunk.

Per-stage settings live in the preset's "stage1" and "stage2" objects (Stage1Settings, Stage2Settings; the
model's sizes in their "model": a size name, tiny / paper / paper_large, or {"size": ..., field: value});
override single keys with dotted flags (`--stage2.lr 1e-4`, `--stage1.model.num-layers 4`) or JSON
(`--stage1 '{"steps": 200}'`), and for every stage trained now with --steps, --lr,
--batch-size, --channels. `--store` takes several compatible stores separated by commas (sampled in
proportion to their clip counts, or by weight: `a.zarr:0.5,b.zarr:0.3,c.zarr:0.2`), or a WebDataset
export (its folder with manifest.json, or shard paths/brace patterns). Without `--val-store`, whole
scenes at the end of the (last) store are held out for evaluation. `--resume` may change the number of
ranks: the data position is global, the rest of the epoch is split over the new ranks.

Multi-GPU: `torchrun --nproc_per_node 8 -m jobs.train --preset paper --stage 1 --store ...`;
batch_size is the global batch per optimizer step (split over ranks and accumulation steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.cli import run as run_main
from jobs.config import DEMO_RUNS, DEMO_STORE, parse_config
from model.data import parse_store_list
from model.diffusion import SAMPLE_STEPS
from model.loop import SCHEDULES
from model.repa import AlignConfig
from model.stage1 import Stage1Config
from model.stage1_diffusion import DiffusionStage1Config
from model.stage2 import DiTConfig
from pipeline.config import ConfigError, at_least, require, to_dict

log = logging.getLogger("re2pix.train")

STAGES = ("1", "2", "baseline", "repa", "videorepa", "all")


@dataclass
class StageConfig:
    """What every stage trains with: the data it reads and the optimization."""

    channels: int | None = None  # PCA channels read and modelled; None: all the store holds
    batch_size: int = 8  # global clips per optimizer step
    grad_accum: int = 0  # micro-batches per optimizer step; 0: the fit plan chooses (model/memory.py)
    steps: int = 100
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant after the warmup
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 1000
    keep_checkpoints: int = 2

    HELP = {  # the --stageN.FIELD flags' help
        "channels": "PCA channels read and modelled (None: all the store holds)",
        "batch_size": "global clips per optimizer step",
        "grad_accum": "micro-batches accumulated per optimizer step (0: the fit plan chooses)",
        "steps": "optimizer steps",
        "lr": "peak learning rate (AdamW)",
        "schedule": "cosine, linear or constant after the warmup",
        "warmup_steps": "linear warmup steps",
        "final_lr_ratio": "the schedule's last lr as a fraction of lr",
        "betas": "AdamW betas (JSON list)",
        "weight_decay": "AdamW weight decay",
        "grad_clip": "gradient norm clip (0: off)",
        "ema_decay": "EMA of the weights (0: none)",
        "log_every": "steps between lines of metrics.jsonl",
        "eval_every": "steps between evaluations (0: at the end only)",
        "ckpt_every": "steps between checkpoints",
        "keep_checkpoints": "checkpoints kept (0: all, for jobs.evaluate --every-checkpoint)",
    }

    def __post_init__(self) -> None:
        """Ranges checked when the config is built, before any store opens or a run folder is made."""
        check_overrides(self)
        at_least(self, 1, "log_every", "ckpt_every")
        at_least(
            self, 0, "grad_accum", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "keep_checkpoints"
        )  # 0: all
        require(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        require(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", "in [0, 1]", self.final_lr_ratio)
        require(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)", self.ema_decay)
        betas_ok = len(self.betas) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)
        require(betas_ok, "betas", "two numbers in [0, 1)", self.betas)


def check_overrides(cfg) -> None:
    """steps, lr, batch_size and channels: a stage's own or the top-level overrides (None: not given)."""
    at_least(cfg, 1, "steps", "batch_size", "channels")
    require(cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), "lr", "a finite number > 0", cfg.lr)


@dataclass
class Stage1Settings(StageConfig):
    """Stage 1: the masked feature transformer; its channels, grid and context come from the store."""

    model: Stage1Config = field(default_factory=Stage1Config.tiny)
    diffusion: bool = False  # forecast by sampling a feature diffusion model (model/stage1_diffusion.py)
    sample_steps: int = DiffusionStage1Config.sample_steps  # with diffusion: its sampler
    sample_solver: str = DiffusionStage1Config.sample_solver
    forecast_samples: int = DiffusionStage1Config.forecast_samples

    HELP = {
        **StageConfig.HELP,
        "model": "the masked feature transformer's size",
        "diffusion": "forecast by sampling a feature diffusion model (model/stage1_diffusion.py)",
        "sample_steps": "with --stage1.diffusion: sampler steps",
        "sample_solver": "with --stage1.diffusion: heun or euler",
        "forecast_samples": "with --stage1.diffusion: the forecast is the mean of this many samples",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 1, "sample_steps", "forecast_samples")


@dataclass
class Stage2Settings(StageConfig):
    """Stage 2 and the DiTs trained like it (Baseline, REPA, VideoREPA); feature and latent channels
    come from the store."""

    model: DiTConfig = field(default_factory=DiTConfig.tiny)
    pred_p: float = 0.1  # probability of predicted future features (mixed supervision)
    nested_dropout: bool = True
    sample_steps: int = SAMPLE_STEPS  # evaluation: sampler steps
    sample_solver: str = "heun"
    sample_clips: int = 4  # evaluation: clips sampled per rank
    align: AlignConfig = field(default_factory=AlignConfig.tiny)  # REPA / VideoREPA (its method: the stage)

    HELP = {
        **StageConfig.HELP,
        "model": "the DiT's size",
        "pred_p": "probability of Stage 1's predicted future features in a batch (mixed supervision)",
        "nested_dropout": "train on random PCA channel prefixes (nested dropout)",
        "sample_steps": "evaluation: sampler steps",
        "sample_solver": "evaluation: heun or euler",
        "sample_clips": "evaluation: clips sampled per rank",
        "align": "REPA / VideoREPA alignment (the stage names the method)",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.pred_p <= 1, "pred_p", "in [0, 1]", self.pred_p)
        at_least(self, 1, "sample_steps", "sample_clips")


@dataclass
class TrainConfig:
    stage: str = field(
        default="1", metadata={"help": "1, 2, baseline, repa, videorepa or all (1 -> rollout -> 2 -> baseline)"}
    )
    store: str = field(
        default=DEMO_STORE, metadata={"help": "store path/URL, several separated by commas, or WebDataset shards"}
    )
    val_store: str | None = field(default=None, metadata={"help": "evaluate on this store (else hold out scenes)"})
    run_dir: str = field(default=DEMO_RUNS, metadata={"help": "checkpoints and logs, one folder per stage"})
    stage1: Stage1Settings = field(default_factory=Stage1Settings, metadata={"help": "JSON: Stage 1 settings"})
    stage2: Stage2Settings = field(
        default_factory=Stage2Settings, metadata={"help": "JSON: Stage 2, Baseline, REPA and VideoREPA settings"}
    )
    steps: int | None = field(default=None, metadata={"help": "override steps of every stage trained now"})
    lr: float | None = field(default=None, metadata={"help": "override lr of every stage trained now"})
    batch_size: int | None = field(default=None, metadata={"help": "override batch_size of every stage trained now"})
    channels: int | None = field(default=None, metadata={"help": "override channels of every stage trained now"})
    semantics: bool = field(default=True, metadata={"help": "--no-semantics: --stage 2 trains the Baseline"})
    val_clips: int = field(default=8, metadata={"help": "clips held out for evaluation when no --val-store"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    on_bad_clip: str = field(
        default="stop",
        metadata={
            "help": "stop | skip: a missing or damaged chunk stops the run with one line, or the clip is skipped "
            "and counted (skipped_clips in metrics.jsonl)"
        },
    )
    prefetch_factor: int = field(default=2, metadata={"help": "batches each DataLoader worker reads ahead"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads per process (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of initialization, data order and noise"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoints"})
    strict_resume: bool = field(
        default=False,
        metadata={"help": "with --resume: stop at a damaged latest checkpoint instead of resuming from the one before"},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    tensorboard: bool = field(
        default=False,
        metadata={"help": "also log to RUN_DIR/STAGE/tensorboard (pip install -e '.[tensorboard]')"},
    )
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on GPU"})
    dry_run: bool = field(
        default=False,
        metadata={"help": "print each stage's parameters, memory per rank, fit plan and data rate, then stop"},
    )
    gpu_memory_gb: float = field(
        default=0.0, metadata={"help": "memory per rank the fit plan fills (0: the device's, 80 without CUDA)"}
    )
    world_size: int = field(default=0, metadata={"help": "--dry-run: ranks to plan for (0: WORLD_SIZE, else 1)"})
    progress: bool = field(default=True, metadata={"help": "a progress bar per stage"})
    rollout_batch_size: int = field(default=8, metadata={"help": "--stage all: clip rows per Stage 1 rollout call"})
    rollout_chunk_rows: int = field(default=64, metadata={"help": "--stage all: rollout rows per progress record"})
    storage_options: dict = field(default_factory=dict, metadata={"help": "JSON fsspec options for store URLs"})

    def __post_init__(self) -> None:
        from model.data import ON_BAD_CLIP

        check_overrides(self)
        require(self.stage in STAGES, "stage", f"one of {', '.join(STAGES)}", self.stage)
        require(self.on_bad_clip in ON_BAD_CLIP, "on_bad_clip", " or ".join(ON_BAD_CLIP), self.on_bad_clip)
        at_least(self, 0, "val_clips", "workers", "threads", "gpu_memory_gb", "world_size")
        at_least(self, 1, "prefetch_factor", "rollout_batch_size", "rollout_chunk_rows")


def stage_config(cfg: TrainConfig, which: str) -> StageConfig:
    """A stage's settings with the top-level --steps, --lr, --batch-size, --channels applied."""
    overrides = {k: getattr(cfg, k) for k in ("steps", "lr", "batch_size", "channels") if getattr(cfg, k) is not None}
    return dataclasses.replace(getattr(cfg, which), **overrides)


def _split(cfg: TrainConfig, probe, stream_kwargs: dict):
    """(train clip indices or None for all, val sources, val clip indices: None for all, "first" for a
    few training batches of a WebDataset, the held-out scenes' record or None)."""
    from model.data import open_stream, split_by_scene
    from pipeline.store.format import check_compatible
    from pipeline.store.reader import Store
    from pipeline.store.tables import held_out_record

    if cfg.val_store:
        val_sources, weights = parse_store_list(cfg.val_store)
        if weights is not None:
            raise ConfigError("--val-store takes no mixing weights: evaluation reads every clip once")
        val = open_stream(val_sources, batch_size=1, remainder="keep", loop=False, **stream_kwargs)
        check_compatible([probe.manifest, val.manifest], [cfg.store, cfg.val_store])
        return None, val.sources, None, None
    if probe.kind == "webdataset":
        log.warning("no --val-store: evaluating on the first 2 training batches of the WebDataset")
        return None, probe.sources, "first", None
    last = Store(probe.sources[-1], cfg.storage_options or None)
    train, held = split_by_scene(last, cfg.val_clips)
    if len(held) == 0:
        log.warning("no --val-store and too few scenes to hold one out: evaluating on training clips")
        return None, probe.sources, np.arange(min(cfg.val_clips, probe.num_clips)), None
    offset = probe.num_clips - len(last)  # held-out scenes come from the last store
    train_idx = np.concatenate([np.arange(offset), offset + train])
    return train_idx, probe.sources, offset + held, held_out_record(last, held)


def dry_run(cfg: TrainConfig) -> dict:
    """Each stage's fit plan as `train_stage` would make it, for cfg.world_size ranks of the device's memory:
    printed, and returned by stage. Sizes from the store when it is there, else from the geometry whose PCA
    channels the model takes (paper or tiny)."""
    import os

    from model.memory import describe, fit_plan, planned_sizes
    from model.tasks import make_task

    world = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    stages = {
        "1": ["stage1"],
        "2": ["stage2" if cfg.semantics else "baseline"],
        "all": ["stage1", "stage2", "baseline"],
    }
    plans = {}
    for stage in stages.get(cfg.stage, [cfg.stage]):
        sc = stage_config(cfg, "stage1" if stage == "stage1" else "stage2")
        geometry, channels, where = planned_sizes(cfg.store, sc)
        task = make_task(stage, sc, geometry, channels)
        plan = fit_plan(stage, sc, task, geometry, world, cfg.amp, cfg.gpu_memory_gb)
        if plan is None:
            print(f"{stage}: no memory estimate for this model")
            continue
        print("\n".join(describe(plan)) + f"\n  sizes from {where}")
        plans[stage] = plan
    return plans


def train_stage(cfg: TrainConfig, stage: str, runtime) -> dict:
    """Train one stage ('stage1', 'stage2', 'baseline', 'repa' or 'videorepa'); returns the loop's summary."""
    from model.checkpoint import check_run_dir
    from model.data import has_pred_features, open_stream
    from model.loop import train
    from model.memory import describe, fit_plan, no_fit, with_checkpointing
    from model.resume import check_resume
    from model.tasks import make_task
    from pipeline.store.lock import locked

    sc = stage_config(cfg, "stage1" if stage == "stage1" else "stage2")
    sources, weights = parse_store_list(cfg.store)
    storage = cfg.storage_options or None
    common = {
        "channels": sc.channels,
        "storage_options": storage,
        "rank": runtime.rank,
        "world": runtime.world,
        "on_bad_clip": cfg.on_bad_clip,
    }
    probe = open_stream(sources, batch_size=1, remainder="keep", loop=False, **common)
    channels, geometry = probe.channels, probe.geometry
    task = make_task(stage, sc, geometry, channels)
    bf16 = cfg.amp and runtime.device.type == "cuda"
    plan = fit_plan(stage, sc, task, geometry, runtime.world, bf16, cfg.gpu_memory_gb)
    if plan is None:
        grad_accum = max(sc.grad_accum, 1)
        per_rank, rem = divmod(sc.batch_size, runtime.world * grad_accum)
        if rem or per_rank < 1:
            raise ConfigError(
                f"{stage}: batch_size {sc.batch_size} is not a multiple of {runtime.world} ranks x "
                f"{grad_accum} accumulation steps"
            )
    else:
        for line in describe(plan) if runtime.is_main else ():
            log.info("%s", line)
        if not plan.fits:
            raise ConfigError(no_fit(stage, plan))
        per_rank, grad_accum = plan.micro_batch, plan.grad_accum
        task.config = with_checkpointing(task.config, plan.checkpointing)
    train_idx, val_sources, val_idx, held_out = _split(cfg, probe, common)
    stream = open_stream(
        sources,
        batch_size=per_rank,
        clips=train_idx,
        with_pred=task.needs_pred_features,
        window=task.train_window,
        latents=task.needs_latents,
        seed=cfg.seed,
        weights=weights,
        channel_blocks=True,  # chunks read straight into the batch; to_device lays channels side by side
        **common,
    )

    def make_val():
        with_pred = stage == "stage2" and has_pred_features(val_sources, storage)
        kw = {"shuffle": False, "remainder": "keep", "loop": False, "with_pred": with_pred, **common}
        kw.update(batch_size=per_rank, latents=task.needs_latents)
        if isinstance(val_idx, str):  # WebDataset without a val store: a few training batches
            import itertools

            return itertools.islice(iter(open_stream(val_sources, **kw)), 2)
        return iter(open_stream(val_sources, clips=val_idx, random_variant=False, **kw))

    loop_cfg = loop_config(
        sc,
        cfg,
        grad_accum,
        extra={
            "stage": stage,
            "store": sources,
            "store_weights": weights,
            "val_store": cfg.val_store,
            "stage_config": to_dict(sc),
        },
    )
    run_dir = Path(cfg.run_dir) / stage
    check_run_dir(run_dir)  # before the lock goes into it: never into a folder that is not a run
    if cfg.resume:
        check_resume(run_dir, loop_cfg, runtime)
    # one trainer per run folder; under torchrun rank 0 holds the lock
    with locked(str(run_dir), f"jobs.train --stage {stage}") if runtime.is_main else contextlib.nullcontext():
        summary = train(
            task,
            loop_cfg,
            stream,
            run_dir,
            runtime=runtime,
            make_val=make_val,
            resume=cfg.resume,
            workers=cfg.workers,
            prefetch_factor=cfg.prefetch_factor,
        )
    if held_out and runtime.is_main:  # beside the stage folder the trainer has made its own
        from model.checkpoint import write_json_atomic
        from model.data import VAL_SCENES

        write_json_atomic(Path(cfg.run_dir) / VAL_SCENES, held_out)
        log.info("held out for evaluation: scenes %s (%s)", held_out["scenes"], Path(cfg.run_dir) / VAL_SCENES)
    return summary


# what the loop takes from the run's settings rather than the stage's
RUN_LOOP_FIELDS = ("compile", "amp", "strict_resume", "tensorboard", "seed", "progress")


def loop_config(sc: StageConfig, cfg: TrainConfig, grad_accum: int, extra: dict):
    """The stage's LoopConfig: every field StageConfig shares with it by name (steps, lr, the schedule, the
    optimizer, logging and checkpointing), the fit plan's grad_accum, and the run-wide RUN_LOOP_FIELDS.
    One place copies them, so a field added to both classes reaches the loop without another line here."""
    from model.loop import LoopConfig

    shared = {f.name for f in dataclasses.fields(LoopConfig)} & {f.name for f in dataclasses.fields(StageConfig)}
    kw = {k: getattr(sc, k) for k in shared}
    kw.update({k: getattr(cfg, k) for k in RUN_LOOP_FIELDS})
    kw.update(betas=tuple(sc.betas), grad_accum=grad_accum, extra=extra)
    return LoopConfig(**kw)


def rollout_stores(cfg: TrainConfig, runtime) -> list[dict]:
    """Write Stage 1's predictions into every Zarr store that Stage 2 reads (train and val)."""
    from inference.rollout import RolloutOptions, write_rollouts
    from pipeline.store.open import is_webdataset

    storage = cfg.storage_options or None
    stores = parse_store_list(cfg.store)[0] + (parse_store_list(cfg.val_store)[0] if cfg.val_store else [])
    webdataset = [s for s in stores if is_webdataset(s, storage)]
    if webdataset:
        raise ConfigError(
            f"cannot write rollouts into WebDataset shards ({webdataset[0]}): run the rollout on "
            "the Zarr store and export the shards again, then train --stage 2"
        )
    options = RolloutOptions(
        cfg.rollout_batch_size, cfg.rollout_chunk_rows, cfg.amp, progress=cfg.progress, storage_options=storage
    )
    return write_rollouts(str(Path(cfg.run_dir) / "stage1"), ",".join(stores), runtime, options)  # threads: run()


def run(cfg: TrainConfig) -> dict:
    from model.runtime import init_runtime

    if cfg.dry_run:
        return dry_run(cfg)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    runtime = init_runtime(cfg.device)
    results = {}
    try:
        if cfg.stage in ("1", "all"):
            results["stage1"] = train_stage(cfg, "stage1", runtime)
        if cfg.stage == "all":
            results["rollout"] = rollout_stores(cfg, runtime)
        if cfg.stage in ("2", "all") and cfg.semantics:
            results["stage2"] = train_stage(cfg, "stage2", runtime)
        if cfg.stage in ("baseline", "all") or (cfg.stage == "2" and not cfg.semantics):
            results["baseline"] = train_stage(cfg, "baseline", runtime)
        if cfg.stage in ("repa", "videorepa"):
            results[cfg.stage] = train_stage(cfg, cfg.stage, runtime)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main:
        print_summary(results)
    return results


def print_summary(results: dict) -> None:
    """Each stage's final evaluation as a table: one row per metric, columns all / per future frame."""
    for stage, summary in results.items():
        if stage == "rollout":
            for r in summary:
                print(
                    f"rollout -> {r['store']}: {r['rows']} rows ({r['written']} written now), "
                    f"checkpoint {r['fingerprint'][:12]}"
                )
            continue
        print(f"{stage}: step {summary['step']}, train loss {summary['loss']:.4g}, checkpoint {summary['checkpoint']}")
        rows: dict[str, dict[str, float]] = {}
        for key, value in summary["eval"].items():
            parts = key.split("/")
            frame = next((p for p in parts if p[0] == "t" and p[1:].isdigit()), "all")
            name = " ".join(p for p in parts if p != frame)
            rows.setdefault(name, {})[frame] = value
        columns = ["all"] + sorted({c for r in rows.values() for c in r} - {"all"})
        print("  " + f"{'':28s}" + "".join(f"{c:>10s}" for c in columns))
        for name in sorted(rows, key=lambda n: (n.startswith("copy_last"), n)):
            cells = "".join(f"{rows[name][c]:10.4g}" if c in rows[name] else f"{'':10s}" for c in columns)
            print(f"  {name:28s}{cells}")


def parse(argv=None) -> TrainConfig:
    cfg = parse_config(TrainConfig, "train", argv, description=__doc__)[0]
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return cfg


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg = parse(argv)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, resume_hint="rerun the same command with --resume to continue"))
