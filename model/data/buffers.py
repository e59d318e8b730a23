"""The tensors a stream decodes its batches into, and their reuse (ClipStream.batches(reuse=True)).

Arrays are decoded straight into the batch's tensors: in shared memory inside a DataLoader worker
(handed over without a copy), pinned for an asynchronous copy to the GPU when asked. Reusing them saves
the kernel's zeroing of fresh pages, about a quarter of a clip's read: in the training process one pool
of tensors; with DataLoader workers, sets of them in /dev/shm made before the workers start (each worker
maps them once, as it starts), so that a batch in one crosses over as the set's number and sizes only
(nothing to pass, map or copy per batch), with a flag per set in shared memory (set by the worker that
fills it, cleared in the training process once it has moved past the batch in it).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.errors import Re2pixError

log = logging.getLogger("re2pix.data")

SHM = "/dev/shm"
SMALL = ("clip", "variant", "window_start")  # a batch's int64 tensors


class ShmError(Re2pixError):
    """The DataLoader workers' batch sets cannot fit in /dev/shm's free space."""


def shm_free() -> int | None:
    """Bytes free in /dev/shm, where DataLoader workers' batch tensors live (None: there is none)."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized float16 tensor in shared memory: a DataLoader worker hands it over by handle."""
    storage = torch.UntypedStorage._new_shared(2 * math.prod(shape))
    return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)


def set_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of one set of a batch's float16 tensors of these shapes."""
    return 2 * sum(math.prod(shape) for shape in shapes.values())


def fit_prefetch(workers: int, prefetch_factor: int, shapes: dict[str, tuple[int, ...]]) -> int:
    """The prefetch factor whose reused sets, workers x (prefetch + 2) of them in /dev/shm (batches in
    the DataLoader's queue, one being built, one in the training step), fit its free space: the one
    asked for, or a smaller one with a warning; one line saying what to set when not even 1 fits."""
    free = shm_free()
    size = set_bytes(shapes)
    if free is None:  # no /dev/shm: torch's shared memory is elsewhere
        return prefetch_factor
    fits = free // (workers * size) - 2
    if fits < 1:
        raise ShmError(
            f"{SHM} has {free / 1e9:.2f} GB free, and {workers} DataLoader workers need {workers * 3} batch sets "
            f"of {size / 1e9:.2f} GB ({workers * 3 * size / 1e9:.2f} GB): set --workers "
            f"{free // (3 * size)} or fewer (0 reads in the training process), or a smaller --batch-size, "
            "or give the container a larger /dev/shm (docker --shm-size)"
        )
    if fits < prefetch_factor:
        log.warning(
            "%s has %.2f GB free: %d workers prefetch %d batches each instead of %d (batch sets of %.2f GB)",
            SHM, free / 1e9, workers, fits, prefetch_factor, size / 1e9,
        )  # fmt: skip
    return min(prefetch_factor, fits)


class BufferSets:
    """A stream's batch tensors. In the training process: fresh ones (pinned when asked), or one pool
    used again for every batch (`reuse_here`). In DataLoader workers: fresh ones in shared memory, or the
    sets made by `make_sets` before the workers start: worker w of nw owns the w-th nw-th of them and
    claims a free one per batch (with none free it takes fresh tensors); `hand_over` turns a batch in a
    set into the set's number and sizes, `receive` rebuilds it in the training process and frees the set
    of the batch before it."""

    def __init__(self):
        self.pin_memory = False
        self.pool: dict[str, torch.Tensor] | None = None  # reused batch tensors (reuse, no workers)
        self.in_use: torch.Tensor | None = None  # workers' reused sets: 1 while a batch in it is out
        self.sets: dict[int, dict[str, torch.Tensor]] = {}  # the workers' reused sets (made by make_sets)
        self.current: int | None = None  # the set the batch being built goes into (-1: fresh tensors)
        self.held: int | None = None  # the set of the batch handed out last (training process)

    def reuse_here(self, reuse: bool) -> None:
        """Batches read in the training process: into one pool of tensors (reuse, unpinned) or fresh ones."""
        self.pool = {} if reuse and not self.pin_memory else None

    def make_sets(self, count: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """`count` sets of tensors of these shapes for the workers (pages are taken when first written)."""
        self.in_use = torch.zeros(count, dtype=torch.int8).share_memory_()
        self.sets = {k: {name: shared(shape) for name, shape in shapes.items()} for k in range(count)}
        self.held = None

    def drop_sets(self) -> None:
        self.in_use, self.sets, self.held = None, {}, None

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialized float16 batch tensor to decode into: in shared memory inside a DataLoader
        worker (the DataLoader then hands it over without a copy), pinned when asked in this process,
        or one used before (reuse)."""
        info = get_worker_info()
        if info is None:
            if self.pool is None:
                return torch.empty(shape, dtype=torch.float16, pin_memory=self.pin_memory)
            pool = self.pool
        else:
            if self.in_use is None:
                return shared(shape)
            if self.current is None:  # the batch's first tensor: claim one of this worker's free sets
                per = len(self.in_use) // info.num_workers
                free = [k for k in range(info.id * per, (info.id + 1) * per) if self.in_use[k] == 0]
                self.current = free[0] if free else -1
                if free:
                    self.in_use[free[0]] = 1
            if self.current < 0:
                return shared(shape)
            held = self.sets[self.current].get(name)
            if held is None or held.shape[1:] != shape[1:] or len(held) < shape[0]:
                return shared(shape)  # a size the sets were not made for: handed over by handle
            return held[: shape[0]]
        if name not in pool or tuple(pool[name].shape) != shape:
            pool[name] = torch.empty(shape, dtype=torch.float16)
        return pool[name]

    def hand_over(self, batch: dict) -> dict:
        """A worker's finished batch as it leaves the worker: if built in reused set k, by reference (the
        set's tensors by their sizes, the small ones as numpy arrays, pickled by value: a tensor would
        cross in a shared-memory file); the next batch claims a set anew."""
        if self.current is not None:
            if self.current >= 0:
                held = self.sets[self.current]
                in_set = {
                    name: len(v)
                    for name, v in batch.items()
                    if name in held and torch.is_tensor(v) and v.data_ptr() == held[name].data_ptr()
                }
                out = {name: v.numpy() if name in SMALL else v for name, v in batch.items() if name not in in_set}
                batch = {**out, "buffer_set": self.current, "in_set": in_set}
            self.current = None
        return batch

    def receive(self, batch: dict, view: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
        """A batch from a worker as the training process hands it out, its set's tensors rebuilt (pinned
        when asked, as `view` lays them out); the set of the batch before it is free again."""
        if self.held is not None:
            self.in_use[self.held] = 0
        self.held = batch.pop("buffer_set", None)
        for name, n in batch.pop("in_set", {}).items():
            batch[name] = self.sets[self.held][name][:n]
            if self.pin_memory:
                batch[name] = batch[name].pin_memory()
            batch[name] = view(name, batch[name])
        for name in SMALL:
            if isinstance(batch.get(name), np.ndarray):
                batch[name] = torch.from_numpy(batch[name])
        if self.pin_memory and self.held is not None:  # copied into pinned memory
            self.in_use[self.held], self.held = 0, None
        return batch
