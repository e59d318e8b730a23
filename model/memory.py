"""What a training step needs per rank, before it runs: memory (weights, gradients, Adam, EMA,
activations per clip with and without activation checkpointing), compute and data, and the plan that
fits the global batch into the memory of one device (micro-batch, accumulation, checkpointing).

Activations are the tensors autograd keeps for the backward pass, in bytes per token and model width
per block. The coefficients were counted with ``torch.autograd.graph.saved_tensors_hooks`` on these
models (scripts/gpu_check.py measures the estimate against real peaks): the DiT block keeps its
input, the norms (float32 under autocast too: RMSNorm, the QK-norm and RoPE compute in float32), q/k/v,
the attention output and the 4x MLP hidden twice (before and after GELU); Stage 1's separable block
keeps two attentions and the MLP, and dropout masks in training. Attention is fused (flash or
memory-efficient on GPU, the flash kernel on CPU): no tokens x tokens matrix is kept. With
checkpointing a block keeps only its input, and the backward pass recomputes one block at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError

GiB = 1024**3
# bytes per (token x width) that one block keeps for the backward pass: float32 / bf16 autocast
DIT_BLOCK = {"fp32": 104, "bf16": 66}
DIT_OUTSIDE = {"fp32": 16, "bf16": 8}  # embeddings, final layer and loss, same unit
STAGE1_BLOCK = {"fp32": 88, "bf16": 44}
STAGE1_DROPOUT = {"fp32": 20, "bf16": 10}  # the MLP's dropout masks and outputs
STAGE1_OUTSIDE = {"fp32": 6, "bf16": 3}
CHECKPOINTED_BLOCK = {"fp32": 4, "bf16": 2}  # only the block's input
# the share of a device's memory a plan may fill: the rest is the CUDA context, cuBLAS/cuDNN workspaces
# and the caching allocator's fragmentation
USABLE = 0.9
# the step time behind the data rate: this share of an H100's dense bf16 peak (989 TFLOP/s)
ASSUMED_FLOPS = 0.4 * 989e12


@dataclass
class Footprint:
    """Bytes per rank of one model's training step."""

    name: str
    parameters: int
    weights: int  # float32 master weights
    grads: int
    optimizer: int  # Adam's two moments
    ema: int
    autocast_copies: int  # bf16 copies of the weights autocast keeps during a step
    activations: int  # per clip, every block's activations kept
    activations_checkpointed: int  # per clip, block inputs kept and one block recomputed
    # per clip: the gradients of the block the backward pass is in, beside what is still kept (one block's
    # activations; the term that brought the estimate to the measured CPU peaks, scripts/gpu_check.py)
    workspace: int
    inputs: int  # per clip: the batch on the device
    flops: float  # per clip, forward + backward without recomputation
    read_bytes: int  # per clip, read from the store

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.autocast_copies

    def per_clip(self, checkpointing: bool) -> int:
        kept = self.activations_checkpointed if checkpointing else self.activations
        return kept + self.workspace + self.inputs

    def total(self, micro_batch: int, checkpointing: bool) -> int:
        return self.states + micro_batch * self.per_clip(checkpointing)


def _states(name: str, parameters: int, ema: bool, bf16: bool) -> dict:
    return {
        "name": name,
        "parameters": parameters,
        "weights": 4 * parameters,
        "grads": 4 * parameters,
        "optimizer": 8 * parameters,
        "ema": 4 * parameters if ema else 0,
        "autocast_copies": 2 * parameters if bf16 else 0,
    }


def _count(build) -> tuple[int, object]:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters()), model


def dit_footprint(cfg, geometry, *, ema: bool, bf16: bool, pred_features: bool = False) -> Footprint:
    """The Stage 2 DiT (the Baseline when cfg.semantic is False) on clips of `geometry`."""
    from .stage2 import Re2PixDiT

    params, model = _count(lambda: Re2PixDiT(cfg))
    prec = "bf16" if bf16 else "fp32"
    h, w = geometry.latent_hw
    frames = geometry.latent_frames
    tokens = frames * (h // cfg.patch_spatial) * (w // cfg.patch_spatial)
    unit = tokens * cfg.dim
    per_block, outside = DIT_BLOCK[prec], DIT_OUTSIDE[prec]
    kept = cfg.num_layers * per_block + outside
    checkpointed = cfg.num_layers * CHECKPOINTED_BLOCK[prec] + per_block + outside
    latents = 16 * frames * h * w
    feature = geometry.feature_hw[0] * geometry.feature_hw[1] * cfg.num_pca_channels
    feature_frames = (frames + (geometry.future_latents if pred_features else 0)) if cfg.semantic else 0
    # float32 on the device, plus the float16 copy it arrives as
    inputs = 6 * (latents + feature_frames * feature)
    per_token = sum(
        p.numel()
        for m in [model.x_embedder, model.feature_embedder, model.final_layer.linear]
        + [sub for blk in model.blocks for sub in (blk.attn.qkv, blk.attn.out, blk.mlp)]
        if m is not None
        for p in m.parameters()
    )
    flops = 6 * per_token * tokens + 12 * cfg.num_layers * tokens * tokens * cfg.dim
    return Footprint(
        **_states("Stage 2 DiT" if cfg.semantic else "Baseline DiT", params, ema, bf16),
        activations=unit * kept,
        activations_checkpointed=unit * checkpointed,
        workspace=unit * per_block,
        inputs=inputs,
        flops=flops,
        read_bytes=2 * (latents + feature_frames * feature),
    )


def stage1_footprint(cfg, *, ema: bool, bf16: bool) -> Footprint:
    """Stage 1's masked feature transformer on one window (4 context frames + the target) per clip."""
    from .stage1 import MaskedFeatureTransformer

    params, model = _count(lambda: MaskedFeatureTransformer(cfg))
    prec = "bf16" if bf16 else "fp32"
    hw = cfg.feature_hw[0] * cfg.feature_hw[1]
    tokens = cfg.num_frames * hw
    unit = tokens * cfg.dim
    per_block = STAGE1_BLOCK[prec] + (STAGE1_DROPOUT[prec] if cfg.dropout > 0 else 0)
    kept = cfg.num_layers * per_block + STAGE1_OUTSIDE[prec]
    checkpointed = cfg.num_layers * CHECKPOINTED_BLOCK[prec] + per_block + STAGE1_OUTSIDE[prec]
    window = cfg.num_frames * hw * cfg.num_pca_channels
    # the window in float32 (+ its float16 copy), then the context and target gathered from it
    inputs = 6 * window + 4 * window
    per_token = sum(p.numel() for blk in model.blocks for n, p in blk.named_parameters() if "norm" not in n)
    attention = 4 * cfg.num_layers * tokens * (cfg.num_frames + hw) * cfg.dim  # temporal + spatial, forward
    flops = 6 * per_token * tokens + 3 * attention
    return Footprint(
        **_states("Stage 1", params, ema, bf16),
        activations=unit * kept,
        activations_checkpointed=unit * checkpointed,
        workspace=unit * per_block,
        inputs=inputs,
        flops=flops,
        read_bytes=2 * window,
    )


@dataclass
class Plan:
    """How a rank runs its share of the global batch: micro_batch clips per forward, grad_accum of them
    per optimizer step, with or without activation checkpointing."""

    footprint: Footprint
    world: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    budget: int  # bytes the plan may use per rank
    device_memory: int

    @property
    def estimate(self) -> int:
        return self.footprint.total(self.micro_batch, self.checkpointing)

    @property
    def fits(self) -> bool:
        return self.estimate <= self.budget

    def step_seconds(self, flops_per_s: float = ASSUMED_FLOPS) -> float:
        """One optimizer step at the assumed throughput (recomputation adds a forward: 4/3)."""
        per_rank = self.global_batch // self.world
        return per_rank * self.footprint.flops * (4 / 3 if self.checkpointing else 1) / flops_per_s

    def data_rate(self) -> float:
        """Bytes per second per rank the loader must deliver to keep that step fed."""
        return self.global_batch // self.world * self.footprint.read_bytes / self.step_seconds()


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit(
    footprint: Footprint,
    global_batch: int,
    world: int,
    device_memory: int,
    *,
    grad_accum: int = 0,
    checkpointing: bool | None = None,
) -> Plan:
    """The plan with the fewest recomputations and then the largest micro-batch that fits USABLE of the
    device's memory. grad_accum 0 and checkpointing None are chosen; given values are kept (the plan
    then says whether they fit). A batch that no plan fits returns the smallest one (fits is False).
    ValueError when the global batch does not split over the ranks (and the accumulation given)."""
    per_rank, rem = divmod(global_batch, world * max(grad_accum, 1))
    if rem or per_rank < 1:
        accum = f" x {grad_accum} accumulation steps" if grad_accum else ""
        raise ValueError(f"batch_size {global_batch} is not a multiple of {world} ranks{accum}")
    micros = [per_rank] if grad_accum else divisors_desc(per_rank)
    choices = [checkpointing] if checkpointing is not None else [False, True]
    budget = int(USABLE * device_memory)
    base = {"footprint": footprint, "world": world, "global_batch": global_batch}
    base.update(budget=budget, device_memory=device_memory)
    candidates = [
        Plan(micro_batch=m, grad_accum=global_batch // (world * m), checkpointing=c, **base)
        for c in choices
        for m in micros
    ]
    return next((p for p in candidates if p.fits), candidates[-1])


def describe(plan: Plan) -> list[str]:
    """The plan as lines for a person: parameters, memory by part, the choice, compute and data."""
    fp = plan.footprint
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    ema = f", EMA {gib(fp.ema)}" if fp.ema else ""
    copies = f", bf16 weight copies {gib(fp.autocast_copies)}" if fp.autocast_copies else ""
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    ranks = f"{plan.world} rank{'s' if plan.world > 1 else ''}"
    return [
        f"{fp.name}: {fp.parameters:,} parameters",
        f"  per rank: weights {gib(fp.weights)}, grads {gib(fp.grads)}, Adam {gib(fp.optimizer)}{ema}{copies}",
        f"  activations per clip: {gib(fp.per_clip(False))} kept, {gib(fp.per_clip(True))} with activation "
        f"checkpointing (batch on the device included)",
        f"  plan for {ranks} x {plan.device_memory / GiB:.0f} GiB: global batch {plan.global_batch} = "
        f"{ranks} x micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation steps, "
        f"checkpointing {'on' if plan.checkpointing else 'off'}: {gib(plan.estimate)} of {gib(plan.budget)} usable "
        f"({verdict})",
        f"  compute {fp.flops / 1e12:.1f} TFLOP per clip; at {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s per rank "
        f"(40% of an H100's bf16 peak) a step takes {plan.step_seconds():.2f} s and needs "
        f"{plan.data_rate() / 1e6:.0f} MB/s of store reads per rank",
    ]


def with_checkpointing(config, on: bool):
    """The model config with gradient_checkpointing set (both stages name the switch so)."""
    return dataclasses.replace(config, gradient_checkpointing=on)


def fit_plan(stage: str, sc, task, geometry, world: int, bf16: bool, gpu_memory_gb: float):
    """How each rank runs its share of the global batch (`fit`), or None for a model without an
    estimate (the diffusion Stage 1: then micro-batch = the rank's share / grad_accum, at least 1)."""
    from .tasks import Stage1DiffusionTask, Stage1Task

    if isinstance(task, Stage1DiffusionTask):
        return None
    ema = sc.ema_decay > 0
    if isinstance(task, Stage1Task):
        footprint = stage1_footprint(task.config, ema=ema, bf16=bf16)
    else:
        footprint = dit_footprint(task.config, geometry, ema=ema, bf16=bf16, pred_features=task.needs_pred_features)
    device_memory = gpu_memory_gb * GiB
    if not device_memory:
        cuda = torch.cuda.is_available()
        device_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else 80 * GiB
    checkpointing = True if task.config.gradient_checkpointing else None  # asked for: kept; else chosen
    try:
        return fit(
            footprint, sc.batch_size, world, int(device_memory), grad_accum=sc.grad_accum, checkpointing=checkpointing
        )
    except ValueError as e:
        raise ConfigError(f"{stage}: {e}") from e


def no_fit(stage: str, plan) -> str:
    return (
        f"{stage}: the {plan.footprint.parameters / 1e6:.0f}M-parameter model needs about "
        f"{plan.estimate / GiB:.1f} GiB per rank even at micro-batch {plan.micro_batch} with activation "
        f"checkpointing {'on' if plan.checkpointing else 'off'}, more than the {plan.budget / GiB:.1f} GiB usable of "
        f"{plan.device_memory / GiB:.1f} GiB (--gpu-memory-gb): run on more ranks, a larger device, or a smaller model"
    )


def planned_sizes(store: str, sc) -> tuple:
    """(geometry, channels, where they come from) a dry run plans stage settings `sc` with: the store's when
    it is there, else those of the geometry whose PCA channels the model takes (paper or tiny)."""
    from pipeline.store.geometry import GEOMETRIES, PAPER

    from .data import open_stream, parse_store_list

    sources = parse_store_list(store)[0]
    if all(Path(s).exists() for s in sources):
        probe = open_stream(sources, batch_size=1, remainder="keep", loop=False, channels=sc.channels)
        return probe.geometry, probe.channels, store
    c = sc.model.num_pca_channels
    geometry = next((g for g in GEOMETRIES.values() if g.num_pca_channels == c), PAPER)
    return geometry, sc.channels or geometry.num_pca_channels, "no store: the model's geometry"
