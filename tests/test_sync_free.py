"""A training step never makes the host wait for the device: no `.item()`, no tensor truth value, no copy
to the host and no boolean indexing (its output size is known only after a sync), in Stage 1, Stage 2,
the Baseline, REPA and VideoREPA, between log lines. On a GPU, torch.cuda.set_sync_debug_mode("error")
checks the same; on a CPU a TorchFunctionMode records the calls that would sync there."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import model.loop
from model import stage1, stage2
from model.loop import LoopConfig, train
from model.runtime import Runtime
from model.tasks import AlignTask, Stage1Task, Stage2Task
from pipeline.store.geometry import TINY

# each makes the host wait for the device's result on a GPU
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "cpu",
    "numpy",
    "nonzero",
    "masked_select",
    "unique",
    "equal",
    "allclose",
}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


def _bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class HostSyncs(TorchFunctionMode):
    """Records every call in a block that would make the host wait for the device. `host_tensors`:
    tensors that live on the host on every device (the optimizer's step counters), exempt."""

    def __init__(self, host_tensors=lambda: ()):
        super().__init__()
        self.host_tensors = host_tensors
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        exempt = bool(args) and any(args[0] is t for t in self.host_tensors())
        if not exempt and (name in SYNCING or (name in INDEXING and len(args) > 1 and _bool_index(args[1]))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class RandomClips:
    """A stand-in for a ClipStream: endless batches of random TINY clips (features, latents and
    Stage 1's predicted futures), as the loader hands them out."""

    batch_size = 2
    sources = ["random"]
    manifest: dict = {}  # no store: an empty feature space in meta.json
    channels = TINY.num_pca_channels

    def __init__(self):
        self.position, self.skipped = (0, 0), 0

    def describe(self) -> dict:
        return {"kind": "random"}

    def state_dict(self) -> dict:
        return {"epoch": self.position[0], "batch": self.position[1], "skipped": self.skipped}

    def batches(self, workers=0, prefetch_factor=2, pin_memory=False, reuse=False):
        g = torch.Generator().manual_seed(0)
        b, c = self.batch_size, TINY.num_pca_channels
        while True:
            epoch, n = self.position
            self.position = (epoch, n + 1)
            yield {
                "features": torch.randn((b, TINY.latent_frames, *TINY.feature_hw, c), generator=g).half(),
                "latents": torch.randn((b, *TINY.latents_shape), generator=g).half(),
                "pred_features": torch.randn((b, TINY.future_latents, *TINY.feature_hw, c), generator=g).half(),
                "skipped": 0,
                "epoch": epoch,
                "batch": n,
            }


def _task(stage: str):
    if stage == "stage1":
        return Stage1Task(stage1.Stage1Config.tiny(dropout=0.1), TINY, 64)
    if stage in ("repa", "videorepa"):
        return AlignTask(stage, stage2.DiTConfig.tiny(), TINY, 64)
    # Stage 2 mixes predicted futures in half the time and drops channels; the Baseline takes no features
    return Stage2Task(stage2.DiTConfig.tiny(), TINY, 64, semantic=stage == "stage2", pred_p=0.5)


def syncs_per_step(stage: str, device: str, run_dir, monkeypatch, steps: int = 4) -> list[list[str]]:
    """The syncing calls of each training step of a tiny run (EMA, clipping, 2 micro-batches)."""
    per_step: list[list[str]] = []
    real_step = model.loop.train_step

    def watched(task, trainee, batches, cfg, runtime, step):
        counters = lambda: [s["step"] for s in trainee.optimizer.state.values() if "step" in s]  # noqa: E731
        hook = HostSyncs(counters)
        with hook:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = real_step(task, trainee, batches, cfg, runtime, step)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        per_step.append(hook.calls)
        return out

    monkeypatch.setattr(model.loop, "train_step", watched)
    cfg = LoopConfig(steps=steps, lr=1e-3, grad_accum=2, ema_decay=0.9, log_every=steps, progress=False)
    train(_task(stage), cfg, RandomClips(), run_dir, runtime=Runtime(torch.device(device)))
    return per_step


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["stage1", "stage2", "baseline", "repa", "videorepa"])
def test_a_training_step_makes_no_host_sync(stage, device, tmp_path, monkeypatch):
    per_step = syncs_per_step(stage, device, tmp_path / stage, monkeypatch)
    assert per_step == [[]] * 4


@pytest.mark.parametrize(
    "sync",
    [
        lambda x: x.sum().item(),
        lambda x: x[x > 0],  # boolean indexing: the output size needs the mask on the host
        lambda x: bool(x.mean() > 0),
    ],
)
def test_the_hook_sees_a_sync(sync):
    hook = HostSyncs()
    with hook:
        sync(torch.randn(8))
    assert len(hook.calls) == 1
