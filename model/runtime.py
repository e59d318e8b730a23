"""Where training runs: the device, the DDP process group under `torchrun` (NCCL on GPU, gloo on
CPU), moving batches to the device, bf16 autocast and TF32 matmuls on GPU."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Each value averaged over the ranks (one collective), as Python floats."""
        t = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(()) for v in values.values()]
        )
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world
        return dict(zip(values, t.tolist()))


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
        fast_math()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    if dist.is_initialized():
        return Runtime(dev, dist.get_rank(), dist.get_world_size())
    return Runtime(dev)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch to the device (asynchronously from pinned memory); stored float16 arrays become
    float32 there (the conversion on the CPU was a third of the loader's time). Channel-blocked features
    [B, F, H, W, nb, k] (model/data/zarr_stream.py) travel as they lie in memory and become [B, F, H, W, nb * k] on
    the device, in the same pass as the conversion."""

    def move(name, v):
        v = v.to(device, non_blocking=True)
        if name == "features" and v.dim() == 6:
            out = torch.empty((*v.shape[:4], v.shape[4] * v.shape[5]), dtype=torch.float32, device=device)
            out.view(v.shape).copy_(v)
            return out
        return v.float() if v.is_floating_point() else v

    return {k: move(k, v) if torch.is_tensor(v) else v for k, v in batch.items()}


def fast_math() -> None:
    """TF32 for the float32 matmuls and convolutions left outside autocast (10 mantissa bits, as bf16's
    inputs have fewer), and cuDNN's autotuner: every step has the same shapes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """bf16 or None (float32) for a precision name; "auto" is bf16 on GPU and float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def autocast_network(model, dtype: torch.dtype | None, device):
    """model's forward under autocast to dtype (unchanged for None): a sampler that calls it keeps its
    own update arithmetic in float32 (model.diffusion.denoise takes the output as float32)."""
    if dtype is None:
        return model

    def forward(*args, **kwargs):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return model(*args, **kwargs)

    return forward


def autocast(runtime: Runtime, enabled: bool):
    if enabled and runtime.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
