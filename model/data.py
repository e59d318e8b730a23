"""Streaming training clips from stores: Zarr stores (random access) or WebDataset exports (shards).

A `ClipStream` is an IterableDataset that yields whole per-rank batches at positions (epoch, batch),
so that the order of batches is a pure function of (seed, epoch, rank) and not of how many
DataLoader workers read them. `open_stream` picks the reader for the sources' format
(pipeline/store/open.py):

- `ZarrStream`: each epoch has one global order of clips, a function of the seed and the epoch only
  (`epoch_order`): a permutation of all clips, or with mixing weights (`a.zarr:0.5,b.zarr:0.5`,
  `parse_store_list`) as many clips as the stores hold together, store k supplying its share
  w_k / sum(w) of them, drawn without replacement from an endless sequence of permutations of its own
  clips (so across epochs a down-weighted store shows every clip before any repeats), then shuffled
  together. Only then is the order split: global batch b is clips [b*W*B, (b+1)*W*B) of it, of which
  rank r of W takes every W-th; worker w of a DataLoader builds every nw-th batch (the DataLoader hands
  batches out round-robin, which restores the order). Every rank gets the same number of batches:
  the remainder is dropped (`remainder="drop"`, other clips each epoch since the order changes) or
  filled by repeating the start of the epoch's order (`"pad"`); `"keep"` keeps the uneven tail
  for evaluation and rollouts, where no collective runs per batch. A resumed stream continues with
  exactly the batches an uninterrupted run would have seen; its position is global (clips of the
  epoch's order done), so a run stopped at W ranks resumes at W' ranks (or another per-rank batch)
  with the rest of the epoch's order split over the new ranks: no clip of the epoch repeated or
  skipped.
- `WebDatasetStream` (a folder/URL with `manifest.json` from `export_webdataset`, or shard
  paths/brace patterns beside one): tar shards cannot seek, so each rank and worker draws shards at
  random with replacement ("resampled") into a shuffle buffer, an endless stream of which every rank
  takes the same number of batches per nominal epoch. Resuming reseeds the stream from the position:
  the batches after a resume are reproducible but not those an uninterrupted run would have seen.
  Flip variants are separate samples there. With mixing weights, each draw picks a source by its
  weight, then one of its shards.

`state_dict()` is the position of the next batch: (epoch, batch) and, for Zarr, `clips_done`, the clips
of the epoch's global order handed out before it (and the count of skipped clips); batches() keeps it
current in the training process whether the batches are read there or in DataLoader workers.

Damaged data (`DamagedStoreError` from the reader): `on_bad_clip="stop"` lets it through (the job
prints it as one line); `"skip"` logs the clip once, counts it in `skipped`, and fills its slot with
the next readable clip of the rank's epoch (training batches keep their size and count), or leaves
it out (evaluation); in a WebDataset, the rest of the damaged shard is skipped.

Every batch is a dict: features [B, 7, H, W, c] float16 (the first c PCA channels; [B, window, ...]
with a window, its first frame in window_start [B] int64; with channel_blocks, [B, 7, H, W, nb, k]
where the store's chunks allow it, see below), latents [B, 16, 7, h, w] float16 (unless
latents=False), pred_features [B, 3, H, W, c] float16 when asked for (as stored; the loop casts them
to float32 on the device), clip [B] int64 (index into the concatenated stores; -1 for WebDataset),
variant [B] int64, clip_id (list of str), skipped (clips skipped while building it) and the batch's
position `epoch`, `batch` (ints). Arrays are decoded straight into the batch's tensors:
in shared memory inside a DataLoader worker (handed over without a copy), pinned for an
asynchronous copy to the GPU when asked.

channel_blocks (the training loop asks for it): a store whose features are read directly (uncompressed,
local) keeps each frame's channels in chunks of k (128) channels, [H, W, k] each. Putting them side by
side into [H, W, c] rows on the CPU is a second pass over every byte after the file read (about as
costly as the read itself). With channel_blocks a batch's features are a view [B, F, H, W, nb, k] of
memory laid out [B, F, nb, H, W, k], into which each chunk is read straight from its file; the loop's
to_device (model/runtime.py) moves it to the device as it is and lays the channels side by side there,
in the same pass that makes them float32. Where the store cannot (compressed or remote stores, a
channel count that is not whole chunks, WebDataset) features stay [B, F, H, W, c]: `block` is None.

Example:
    stream = open_stream(["a.zarr", "b.zarr"], batch_size=8, channels=256, seed=0, weights=[0.7, 0.3])
    for batch in stream.batches(workers=4, pin_memory=True): ...
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError, Re2pixError
from pipeline.store.format import VARIANT_SUFFIX, DamagedStoreError, StoreError, check_compatible
from pipeline.store.geometry import Geometry
from pipeline.store.open import WEBDATASET, expand_shards, is_webdataset, source_format
from pipeline.store.reader import Store, open_stores
from pipeline.store.wds import manifest_shapes

log = logging.getLogger("re2pix.data")


class ShmError(Re2pixError):
    """The DataLoader workers' batch sets cannot fit in /dev/shm's free space."""


SHM = "/dev/shm"
REMAINDERS = ("drop", "pad", "keep")
_SMALL = ("clip", "variant", "window_start")  # a batch's int64 tensors
ON_BAD_CLIP = ("stop", "skip")
_MIX = 0x6D6978  # keeps the mixing draws' seeds apart from the epochs' ([seed, epoch])
MISSING_PRED = (
    "{where} has no finished clips/pred_features, and this run needs them (Stage 2 mixed "
    "supervision): run the rollout job on it first (make rollout), or set the mixing "
    "probability to 0"
)


def parse_store_list(spec: str) -> tuple[list[str], list[float] | None]:
    """The locations of a `--store` list and their mixing weights: `a.zarr,b.zarr` -> (both, None: clips
    sampled in proportion to the stores' clip counts); `a.zarr:0.7,s3://b/x.zarr:0.3` -> (both, [0.7, 0.3]).
    A weight is a trailing `:number` (a URL's `host:port` is not one); give every store one or none."""
    sources, weights = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        head, _, tail = item.rpartition(":")
        weight = None
        if head and not (head.endswith(("/", ":")) or ("://" in head and "/" not in head.split("://", 1)[1])):
            try:
                weight = float(tail)
            except ValueError:
                pass
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise StoreError(f"--store {item!r}: a mixing weight must be a positive number")
        sources.append(item if weight is None else head)
        weights.append(weight)
    if not sources:
        raise StoreError(f"--store {spec!r} names no store")
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = [s for s, g in zip(sources, given) if not g]
        raise StoreError(f"--store {spec!r}: give every store a mixing weight or none ({missing[0]} has none)")
    return sources, (weights if all(given) else None)


def apportion(weights, n: int) -> np.ndarray:
    """n clips split in proportion to `weights` (largest remainders, ties to the earlier store)."""
    share = np.asarray(weights, np.float64) / np.sum(weights) * n
    counts = np.floor(share).astype(np.int64)
    rest = int(n - counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    return counts


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and the world size (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _wds_manifest(folder: str, storage_options: dict | None = None) -> dict:
    from pipeline.store.wds import read_wds_manifest

    return read_wds_manifest(folder, storage_options)


def has_pred_features(sources, storage_options: dict | None = None) -> bool:
    """Whether every source holds finished Stage 1 rollouts (Zarr) or exported them (WebDataset)."""
    for s in [sources] if isinstance(sources, str) else sources:
        if is_webdataset(s, storage_options):
            if not _wds_manifest(expand_shards(s, storage_options)[0], storage_options)["webdataset"].get(
                "has_pred_features"
            ):
                return False
        elif not Store(s, storage_options).has_pred_features:
            return False
    return True


def open_stream(sources, **options) -> ClipStream:
    """The stream for `sources` (one location or several, all Zarr or all WebDataset): ZarrStream or
    WebDatasetStream with `options` (ClipStream's, plus each reader's own)."""
    sources = [sources] if isinstance(sources, str) else [str(s) for s in sources]
    if source_format(sources, options.get("storage_options")) == WEBDATASET:
        if options.pop("clips", None) is not None:
            raise ValueError("clip indices select rows of Zarr stores; a WebDataset stream reads all its samples")
        options.pop("random_variant", None)  # flip variants are samples of their own there
        return WebDatasetStream(sources, **options)
    options.pop("shuffle_buffer", None)
    return ZarrStream(sources, **options)


class ClipStream(IterableDataset):
    """Batches of clips for one DDP rank (see module doc); ZarrStream and WebDatasetStream read them.

    batch_size is per rank (one micro-batch). channels: read only the first c PCA channels (None:
    all). window: read only `window` consecutive feature frames of each clip, at a start drawn per clip
    and epoch (Stage 1 training: its context frames and target); None: all 7. latents: read them
    (Stage 1 does not need them). with_pred: also read Stage 1 rollouts (clear error if a source has
    none). loop: repeat over epochs forever (training) or stop after one epoch (evaluation, rollouts).
    weights: one mixing weight per source (training, loop=True), None: sources in proportion to their clips.
    """

    kind = ""

    def __init__(
        self,
        sources: list[str],
        *,
        batch_size: int,
        channels: int | None = None,
        window: int | None = None,
        latents: bool = True,
        with_pred: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "drop",
        loop: bool = True,
        rank: int | None = None,
        world: int | None = None,
        storage_options: dict | None = None,
        on_bad_clip: str = "stop",
        weights: list[float] | None = None,
        channel_blocks: bool = False,
    ):
        if not sources:
            raise ValueError("a clip stream needs at least one store or WebDataset source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if remainder == "keep" and loop:
            raise ValueError('remainder="keep" gives ranks uneven batch counts: only for loop=False')
        if on_bad_clip not in ON_BAD_CLIP:
            raise ValueError(f"on_bad_clip must be one of {ON_BAD_CLIP}, got {on_bad_clip!r}")
        if weights is not None:
            weights = [float(x) for x in weights]
            if len(weights) != len(sources):
                raise ValueError(f"{len(weights)} mixing weights for {len(sources)} sources")
            if not all(math.isfinite(x) and x > 0 for x in weights):
                raise ValueError(f"mixing weights must be positive numbers, got {weights}")
            if not loop:
                raise ValueError("mixing weights draw training epochs (loop=True); evaluation reads every clip once")
        self.weights = weights
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.sources, self.storage_options = list(sources), storage_options
        self.batch_size, self.with_pred, self.shuffle, self.seed = batch_size, with_pred, shuffle, seed
        self.window, self.latents = window, latents
        self.remainder, self.loop, self.on_bad_clip = remainder, loop, on_bad_clip
        self.position = (0, 0)  # (epoch, batch) of the next batch to hand out
        # a resume under another layout (world size x batch) mid-epoch: (that epoch, clips of its global
        # order done before it); batch 0 of that epoch starts there
        self._resumed_at = (-1, 0)
        self.skipped = 0  # damaged clips skipped so far (on_bad_clip="skip")
        self.pin_memory = False
        self._pool: dict[str, torch.Tensor] | None = None  # reused batch tensors (batches(reuse=True))
        self._in_use: torch.Tensor | None = None  # workers' reused sets: 1 while a batch in it is out
        self._sets: dict[int, dict[str, torch.Tensor]] = {}  # the workers' reused sets (made by batches())
        self._set: int | None = None  # the set the batch being built goes into (-1: fresh tensors)
        self.manifest, self.store_channels, self.num_clips = self._open_sources()
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        c = self.store_channels if channels is None else int(channels)
        if not 0 < c <= self.store_channels:  # a setting the data cannot serve: one line (ConfigError)
            raise ConfigError(
                f"asked for {channels} feature channels (--channels); the {self.kind} source holds "
                f"{self.store_channels}"
            )
        self.channels = c
        self.block = self._feature_block(c) if channel_blocks else None  # see the module doc
        frames = self.geometry.latent_frames
        if window is not None and not 0 < window <= frames:
            raise ValueError(f"window must be in 1..{frames} feature frames, got {window}")
        self._plan_sizes()
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"{self.num_clips} clips cannot fill one batch of {batch_size} on each of "
                f"{self.world} ranks: use a smaller batch (--batch-size) or more clips"
            )
        if self.rank == 0 and self.dropped_per_epoch:
            how = "dropped" if remainder == "drop" else "repeated (resampled)"
            log.warning(
                "%d of %d clips per epoch are %s so that each of %d ranks gets %d batches of %d",
                self.dropped_per_epoch,
                self.num_clips,
                how,
                self.world,
                self.batches_per_epoch,
                batch_size,
            )

    # ---- what a reader provides ---------------------------------------------------------------------
    def _open_sources(self) -> tuple[dict, int, int]:
        """Check the sources; (manifest, feature channels they hold, clips per epoch)."""
        raise NotImplementedError

    def _batches(self, worker: int, workers: int):
        """(epoch, batch, batch dict) of this rank, from self.position on, for DataLoader worker `worker`."""
        raise NotImplementedError

    def _feature_block(self, c: int) -> int | None:
        """The channel block features can be read in straight from their files (module doc), or None."""
        return None

    # ---- sizes and positions ----------------------------------------------------------------------
    def _plan_sizes(self) -> None:
        self.batches_per_epoch = self._count_batches(self.num_clips)
        used = self.batches_per_epoch * self.world * self.batch_size  # drop: fewer than n; pad: more
        self.dropped_per_epoch = 0 if self.remainder == "keep" else abs(self.num_clips - used)

    def _count_batches(self, n: int) -> int:
        """Batches per rank that n clips of an epoch's order make under this stream's layout."""
        w, b = self.world, self.batch_size
        if self.remainder == "keep":  # uneven, for evaluation: rank 0 has the most
            return math.ceil(math.ceil(n / w) / b)
        if self.remainder == "pad" and self.kind != WEBDATASET:
            return math.ceil(max(n, 0) / (w * b))
        return max(n, 0) // (w * b)  # drop (a resampled WebDataset stream has no remainder: its epoch is nominal)

    def _epoch_start(self, epoch: int) -> int:
        """Clips of the epoch's global order done before this stream's batch 0 of it (0 but after a resume
        under another layout)."""
        return self._resumed_at[1] if epoch == self._resumed_at[0] else 0

    def epoch_batches(self, epoch: int) -> int:
        """This rank's batches in an epoch: batches_per_epoch, or what is left of the epoch a resume under
        another layout landed in."""
        g = self._epoch_start(epoch)
        return self.batches_per_epoch if g == 0 else self._count_batches(self.num_clips - g)

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at (epoch, batch), batches of this stream's layout from the epoch's start."""
        self._resumed_at = (-1, 0)
        if not 0 <= batch < self.epoch_batches(epoch):
            raise ValueError(f"batch {batch} out of range (epoch {epoch} has {self.epoch_batches(epoch)})")
        self.position = (int(epoch), int(batch))

    def advance(self, epoch: int, batch: int) -> tuple[int, int]:
        """The position after the batch at (epoch, batch)."""
        return (epoch + 1, 0) if batch + 1 >= self.epoch_batches(epoch) else (epoch, batch + 1)

    def clips_done(self) -> int:
        """Clips of the current epoch's global order handed out before the next batch (all ranks together)."""
        epoch, b = self.position
        return self._epoch_start(epoch) + b * self.world * self.batch_size

    def state_dict(self) -> dict:
        """The position of the next batch: what a checkpoint stores to resume from. clips_done is global,
        the same on every rank: the position to resume from at any world size."""
        return {
            "epoch": self.position[0],
            "batch": self.position[1],
            "clips_done": self.clips_done(),
            "seed": self.seed,
            "skipped": self.skipped,
            "batches_per_epoch": self.batches_per_epoch,
            "world": self.world,
            "batch_size": self.batch_size,
            "kind": self.kind,
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        epoch = int(state["epoch"])
        if self.kind == "zarr" and "clips_done" in state:
            if "world" in state and (state["world"], state["batch_size"]) != (self.world, self.batch_size):
                log.info(
                    "resuming epoch %d after %d clips of its order, handed out by %d ranks x %d; now %d x %d",
                    epoch,
                    state["clips_done"],
                    state["world"],
                    state["batch_size"],
                    self.world,
                    self.batch_size,
                )
            self._resume_at(epoch, int(state["clips_done"]))
            return
        if state.get("batches_per_epoch") not in (None, self.batches_per_epoch):
            log.warning(
                "the checkpoint's epochs had %s batches, this stream's have %d (other stores, batch size "
                "or world size): resuming at the same epoch, batch index",
                state["batches_per_epoch"],
                self.batches_per_epoch,
            )
            self.position = (epoch, min(int(state["batch"]), self.batches_per_epoch - 1))
            return
        self.set_position(epoch, state["batch"])

    def _resume_at(self, epoch: int, done: int) -> None:
        """Continue the epoch's global order after its first `done` clips, whatever layout handed them out."""
        per_batch = self.world * self.batch_size
        self._resumed_at = (-1, 0)
        if done % per_batch == 0:  # on a batch boundary of this layout: an ordinary position
            self.position = (epoch, done // per_batch)
        else:
            self._resumed_at, self.position = (epoch, done), (epoch, 0)
        if self.position[1] >= self.epoch_batches(epoch):  # too little left for one batch of this layout
            self.position = (epoch + 1, 0)

    def _record(self, batch: dict) -> None:
        self.position = self.advance(batch["epoch"], batch["batch"])
        self.skipped += batch["skipped"]

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch, b, batch in self._batches(worker, workers):
            batch.update(epoch=epoch, batch=b)
            if self._set is not None:  # a worker's reused set: batches() rebuilds the batch and releases it
                if self._set >= 0:
                    batch = self._by_reference(batch, self._set)
                self._set = None
            if info is None:  # read here: this is the stream the loop asks for its state
                self._record(batch)
            yield batch

    def batches(self, workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False, reuse: bool = False):
        """The training loop's batches from self.position on: read here (workers=0) or in `workers`
        DataLoader processes; pinned for asynchronous host-to-GPU copies when asked (torch's pinned
        allocator reuses blocks once their copies are done). state_dict() follows the batches handed out.

        reuse: decode batches into tensors used again, so a batch is valid until the next is asked for
        (the loop's to_device copies it first); this saves the kernel's zeroing of fresh pages, about a
        quarter of a clip's read. Here: one set of tensors. In workers: each keeps prefetch_factor + 2
        sets in shared memory and reuses one once this process has moved past the batch in it (a flag
        per set, in shared memory: set by the worker, cleared here); with none free it takes fresh ones.
        Where /dev/shm cannot hold them all, workers prefetch fewer batches (_fit_prefetch).
        The sets are made here before the workers start, so a batch in one crosses over as the set's
        number and sizes only (no file descriptor to pass, nothing to map, no copy)."""
        self.pin_memory = pin_memory
        if workers == 0:
            self._pool = {} if reuse and not pin_memory else None
            try:
                yield from self
            finally:
                self._pool = None
            return
        if reuse:
            prefetch_factor = self._fit_prefetch(workers, prefetch_factor)
            sets = workers * (prefetch_factor + 2)
            self._in_use = torch.zeros(sets, dtype=torch.int8).share_memory_()
            shapes = self._batch_shapes(self.batch_size)  # pages are taken when first written, not here
            self._sets = {k: {name: _shared(shape) for name, shape in shapes.items()} for k in range(sets)}
        held = None  # the set of the batch handed out last
        try:
            for batch in make_loader(self, workers, prefetch_factor, pin_memory):
                self._record(batch)
                if held is not None:
                    self._in_use[held] = 0
                held = batch.pop("buffer_set", None)
                for name, n in batch.pop("in_set", {}).items():
                    batch[name] = self._sets[held][name][:n]
                    if pin_memory:
                        batch[name] = batch[name].pin_memory()
                    batch[name] = self._view(name, batch[name])
                for name in _SMALL:
                    if isinstance(batch.get(name), np.ndarray):
                        batch[name] = torch.from_numpy(batch[name])
                if pin_memory and held is not None:  # copied into pinned memory
                    self._in_use[held], held = 0, None
                yield batch
        finally:
            self._in_use, self._sets = None, {}

    def _fit_prefetch(self, workers: int, prefetch_factor: int) -> int:
        """The prefetch factor whose reused sets, workers x (prefetch + 2) of them in /dev/shm (batches in
        the DataLoader's queue, one being built, one in the training step), fit its free space: the one
        asked for, or a smaller one with a warning; one line saying what to set when not even 1 fits."""
        free = shm_free()
        set_bytes = 2 * sum(math.prod(shape) for shape in self._batch_shapes(self.batch_size).values())
        if free is None:  # no /dev/shm: torch's shared memory is elsewhere
            return prefetch_factor
        fits = free // (workers * set_bytes) - 2
        if fits < 1:
            raise ShmError(
                f"{SHM} has {free / 1e9:.2f} GB free, and {workers} DataLoader workers need {workers * 3} batch sets "
                f"of {set_bytes / 1e9:.2f} GB ({workers * 3 * set_bytes / 1e9:.2f} GB): set --workers "
                f"{free // (3 * set_bytes)} or fewer (0 reads in the training process), or a smaller --batch-size, "
                "or give the container a larger /dev/shm (docker --shm-size)"
            )
        if fits < prefetch_factor:
            log.warning(
                "%s has %.2f GB free: %d workers prefetch %d batches each instead of %d (batch sets of %.2f GB)",
                SHM, free / 1e9, workers, fits, prefetch_factor, set_bytes / 1e9,
            )  # fmt: skip
        return min(prefetch_factor, fits)

    def _by_reference(self, batch: dict, k: int) -> dict:
        """A worker's batch in reused set k, as batches() rebuilds it: the set's tensors by their sizes,
        the small ones as numpy arrays (pickled by value: a tensor would cross in a shared-memory file)."""
        held = self._sets[k]
        in_set = {
            name: len(v)
            for name, v in batch.items()
            if name in held and torch.is_tensor(v) and v.data_ptr() == held[name].data_ptr()
        }
        out = {name: v.numpy() if name in _SMALL else v for name, v in batch.items() if name not in in_set}
        return {**out, "buffer_set": k, "in_set": in_set}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialized float16 batch tensor to decode into: in shared memory inside a DataLoader
        worker (the DataLoader then hands it over without a copy), pinned when asked in this process,
        or one used before (batches(reuse=True))."""
        info = get_worker_info()
        if info is None:
            if self._pool is None:
                return torch.empty(shape, dtype=torch.float16, pin_memory=self.pin_memory)
            pool = self._pool
        else:
            if self._in_use is None:
                return _shared(shape)
            if self._set is None:  # the batch's first tensor: claim one of this worker's free sets
                per = len(self._in_use) // info.num_workers
                free = [k for k in range(info.id * per, (info.id + 1) * per) if self._in_use[k] == 0]
                self._set = free[0] if free else -1
                if free:
                    self._in_use[free[0]] = 1
            if self._set < 0:
                return _shared(shape)
            held = self._sets[self._set].get(name)
            if held is None or held.shape[1:] != shape[1:] or len(held) < shape[0]:
                return _shared(shape)  # a size the sets were not made for: handed over by handle
            return held[: shape[0]]
        if name not in pool or tuple(pool[name].shape) != shape:
            pool[name] = torch.empty(shape, dtype=torch.float16)
        return pool[name]

    def _batch_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        """The float16 tensors of a batch of b clips, by name, as laid out in memory (see _view)."""
        g, c, k = self.geometry, self.channels, self.block
        shapes = {"features": (b, self._frames(), *g.feature_hw, c)}  # [B, 7 (or window), H, W, c]
        if k is not None:
            shapes["features"] = (b, self._frames(), c // k, *g.feature_hw, k)  # [B, 7, nb, H, W, k]
        if self.latents:
            shapes["latents"] = (b, *g.latents_shape)  # [B, 16, 7, h, w]
        if self.with_pred:
            shapes["pred_features"] = (b, g.future_latents, *g.feature_hw, c)  # [B, 3, H, W, c]
        return shapes

    def _view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor as the batch hands it out: channel-blocked features [B, F, H, W, nb, k]."""
        return t.permute(0, 1, 3, 4, 2, 5) if name == "features" and self.block is not None else t

    def _damaged(self, what: str, error: DamagedStoreError) -> None:
        if self.on_bad_clip == "stop":
            raise error
        log.warning("skipping %s: %s", what, error)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "sources": self.sources,
            "clips": self.num_clips,
            "channels": self.channels,
            "with_pred": self.with_pred,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world": self.world,
            "batches_per_epoch": self.batches_per_epoch,
            "remainder": self.remainder,
            "remainder_clips_per_epoch": self.dropped_per_epoch,
            "on_bad_clip": self.on_bad_clip,
            "window": self.window,
            "latents": self.latents,
            "weights": self.weights,
            "channel_block": self.block,
        }

    def _window_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n window starts (0 without a window: the whole clip)."""
        if self.window is None:
            return np.zeros(n, np.int64)
        return rng.integers(0, self.geometry.latent_frames - self.window + 1, n)

    def _frames(self) -> int:
        return self.geometry.latent_frames if self.window is None else self.window


class ZarrStream(ClipStream):
    """Batches from Zarr stores by random access (see module doc). clips: indices into the
    concatenated stores to draw from (a train/val split); None: all. random_variant: draw a flip
    variant per clip and epoch (else the original)."""

    kind = "zarr"

    def __init__(self, sources: list[str], *, clips=None, random_variant: bool = True, **options):
        self._clip_subset, self.random_variant = clips, random_variant
        self._stores, self._pid = None, os.getpid()
        self._bad: set[tuple[int, int]] = set()  # (clip, variant) found damaged by this process
        super().__init__(sources, **options)

    def _open_sources(self) -> tuple[dict, int, int]:
        stores = open_stores(self.sources, self.storage_options)
        if self.with_pred:
            for s in stores:
                if not s.has_pred_features:
                    raise StoreError(MISSING_PRED.format(where=s.location))
        self.sizes = np.array([len(s) for s in stores])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.store_variants = np.array([s.num_variants for s in stores])
        total = int(self.offsets[-1])
        clips = self._clip_subset
        self.clips = np.arange(total) if clips is None else np.asarray(clips, dtype=np.int64)
        if self.clips.size and (self.clips.min() < 0 or self.clips.max() >= total):
            raise IndexError(f"clip indices must be in 0..{total - 1}")
        if self.weights is not None:  # each store's clips (of the subset), to draw its share from
            store_of = np.searchsorted(self.offsets, self.clips, side="right") - 1
            self._parts = [self.clips[store_of == k] for k in range(len(stores))]
            for s, part in zip(self.sources, self._parts):
                if not len(part):
                    raise StoreError(f"{s} has a mixing weight but no clip to draw from (all held out?)")
        if self.with_pred:
            held = min(s.group["clips/pred_features"].attrs.get("channels", s.num_channels) for s in stores)
            if held < stores[0].num_channels:
                log.warning("rollouts hold %d predicted channels (the rest are zero)", held)
        self._stores, self._pid = stores, os.getpid()
        return stores[0].manifest, stores[0].num_channels, len(self.clips)

    def _feature_block(self, c: int) -> int | None:
        blocks = {s.feature_block(c) for s in self._stores}
        k = blocks.pop() if len(blocks) == 1 else c
        return k if k < c else None  # one block of all c channels is the row layout

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stores"] = None  # each process opens its own handles
        return state

    def _open(self) -> list[Store]:
        if self._stores is None or self._pid != os.getpid():
            self._stores = [Store(s, self.storage_options) for s in self.sources]
            self._pid = os.getpid()
        return self._stores

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's global (clips, variants, window starts): a function of the seed and the epoch only."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            order = self._mixed(epoch)
            order = order[rng.permutation(len(order))] if self.shuffle else order
        else:
            order = self.clips[rng.permutation(self.num_clips)] if self.shuffle else self.clips
        nv = self.store_variants[np.searchsorted(self.offsets, order, side="right") - 1]
        variants = (
            (rng.random(len(order)) * nv).astype(np.int64) if self.random_variant else np.zeros(len(order), np.int64)
        )
        return order, variants, self._window_starts(rng, len(order))

    def _mixed(self, epoch: int) -> np.ndarray:
        """An epoch of the weighted mix, before shuffling: store k's share n_k of num_clips, positions
        epoch*n_k on of an endless sequence of permutations of its clips (cycle j drawn from seed, k, j)."""
        parts = []
        for k, (clips, n) in enumerate(zip(self._parts, apportion(self.weights, self.num_clips))):
            size, lo = len(clips), epoch * int(n)
            first, stop = lo // size, -(-(lo + n) // size)  # the cycles that positions lo .. lo+n-1 fall in
            cycles = [clips[self._cycle(k, j, size)] for j in range(first, stop)]
            parts.append(np.concatenate([clips[:0], *cycles])[lo - first * size :][:n])
        return np.concatenate(parts)

    def _cycle(self, store: int, j: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, store, j, _MIX]).permutation(size)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (clips, variants, window starts) for an epoch, in batch order: global batch b of the
        epoch is clips [g + b*W*B, g + (b+1)*W*B) of its order (g: _epoch_start), rank r takes every W-th."""
        order, variants, starts = self.epoch_order(epoch)
        w, r, n = self.world, self.rank, len(order)
        if self.remainder == "keep":
            idx = np.arange(r, n, w)
        else:  # drop: the epoch's rest is cut to whole batches; pad: wraps around to the start of the order
            used = self.epoch_batches(epoch) * w * self.batch_size
            idx = (self._epoch_start(epoch) + np.arange(used))[r::w] % n
        return order[idx], variants[idx], starts[idx]

    def _batches(self, worker: int, workers: int):
        plan_epoch, plan = None, None
        epoch, b = self.position
        for k in itertools.count():
            if k % workers == worker:
                if epoch != plan_epoch:
                    plan_epoch, plan = epoch, self.epoch_plan(epoch)
                start, stop = b * self.batch_size, (b + 1) * self.batch_size
                if start >= len(plan[0]):  # "keep": a rank with fewer clips has run out
                    return
                # training: a damaged clip's slot takes the next readable clip of the epoch (wrapping)
                spare = _wrapped(plan, stop) if self.loop else ()
                batch = self.read_batch(*(a[start:stop] for a in plan), spare=spare)
                if batch is not None:
                    yield epoch, b, batch
            epoch, b = self.advance(epoch, b)
            if b == 0 and not self.loop:
                return

    def read_batch(self, clips: np.ndarray, variants: np.ndarray, starts: np.ndarray, spare=()) -> dict | None:
        """One batch of clips[j] (flip variant variants[j], window from starts[j]), decoded into the
        batch's tensors. A damaged clip is replaced by the next readable (clip, variant, start) of
        `spare`, or left out; None if none is left."""
        buffers = {name: self._buffer(name, shape) for name, shape in self._batch_shapes(len(clips)).items()}
        feats, lats, preds = (buffers.get(name) for name in ("features", "latents", "pred_features"))
        slots = {name: t.numpy() for name, t in buffers.items()}  # numpy views of the tensors, one per batch
        spare = iter(spare)
        taken, ids, skipped = [], [], 0
        for item in zip(clips, variants, starts):
            while item is not None:
                n = len(ids)
                cid = self._read_clip(
                    *(int(x) for x in item),
                    *(slots[name][n] if name in slots else None for name in ("features", "latents", "pred_features")),
                )
                if cid is not None:
                    taken.append(item)
                    ids.append(cid)
                    break
                skipped += 1
                item = next(spare, None)
        if not ids:
            if self.loop:
                raise StoreError(f"no readable clip left in this epoch of {self.sources}: every one is damaged")
            return None
        n = len(ids)
        clips, variants, starts = (torch.as_tensor(np.array(x, dtype=np.int64)) for x in zip(*taken))
        batch = {"features": self._view("features", feats[:n]), "clip": clips, "variant": variants}
        batch.update(clip_id=ids, skipped=skipped)
        if lats is not None:
            batch["latents"] = lats[:n]
        if preds is not None:
            batch["pred_features"] = preds[:n]
        if self.window is not None:
            batch["window_start"] = starts
        return batch

    def _read_clip(self, clip: int, variant: int, start: int, feats, lats, preds) -> str | None:
        """Decode one clip into batch slots (numpy views); its id, or None when it is damaged and skipped."""
        if (clip, variant) in self._bad:
            return None
        k = int(np.searchsorted(self.offsets, clip, side="right") - 1)
        store, i = self._open()[k], clip - int(self.offsets[k])
        try:
            frames = None if self.window is None else slice(start, start + self.window)
            if self.block is not None:
                store.read_feature_blocks(i, feats, variant, frames)
            else:
                store.read_features(i, self.channels, variant, out=feats, frames=frames)
            if lats is not None:
                store.read_latents(i, variant, out=lats)
            if preds is not None:
                store.read_pred_features(i, self.channels, variant, out=preds)
        except DamagedStoreError as e:
            self._damaged(f"clip {store.clip_ids[i]} (variant {store.variants[variant]}) of {store.location}", e)
            self._bad.add((clip, variant))
            return None
        return store.clip_ids[i] + VARIANT_SUFFIX[store.variants[variant]]


class WebDatasetStream(ClipStream):
    """Batches from WebDataset shards, resampled (see module doc). shuffle_buffer: samples held to
    shuffle from."""

    kind = WEBDATASET

    def __init__(self, sources: list[str], *, shuffle_buffer: int = 256, **options):
        self.shuffle_buffer = shuffle_buffer
        self._pending_skips = 0
        super().__init__(sources, **options)

    def _open_sources(self) -> tuple[dict, int, int]:
        folders, self.urls, self._source_urls, manifests = [], [], [], []
        for s in self.sources:
            folder, shards = expand_shards(s, self.storage_options)
            folders.append(folder)
            self.urls += shards
            self._source_urls.append(shards)
            manifests.append(_wds_manifest(folder, self.storage_options))
        # each sample is checked against its export's shapes, read here once for the whole stream
        shapes = [manifest_shapes(m, folder) for m, folder in zip(manifests, folders)]
        self._shapes = {url: s for s, urls in zip(shapes, self._source_urls) for url in urls}
        check_compatible(manifests, folders)
        if self.with_pred:
            for m, folder in zip(manifests, folders):
                if not m["webdataset"].get("has_pred_features"):
                    raise StoreError(MISSING_PRED.format(where=folder) + " (then export the shards again)")
        channels = min(m["webdataset"]["channels"] for m in manifests)
        return manifests[0], channels, sum(m["webdataset"]["samples"] for m in manifests)  # variants count apart

    def _samples(self, urls):
        """The samples of `urls`; remote shards open through one filesystem per worker (wds.reading_filesystem)."""
        from pipeline.store.wds import iter_shard

        for url in urls:
            try:
                yield from iter_shard(url, self.storage_options, self._shapes[url])
            except DamagedStoreError as e:
                self._damaged(f"the rest of shard {url}", e)
                self._pending_skips += 1

    def _batches(self, worker: int, workers: int):
        epoch, b = self.position
        start = epoch * self.batches_per_epoch + b
        if not self.loop:  # evaluation: every shard once, in order, split over ranks and workers
            urls = self.urls[self.rank :: self.world][worker::workers]
            rng = np.random.default_rng([self.seed, 0, self.rank, worker])
            for j, group in enumerate(_chunks(self._samples(urls), self.batch_size)):
                yield 0, j, self._batch(group, rng)
            return
        rng = np.random.default_rng([self.seed, start, self.rank, worker])
        resampled = self._samples(self._draw_shards(rng))
        # a buffer larger than the sources would read them whole, several times over, before the first batch
        samples = _shuffled(resampled, min(self.shuffle_buffer, self.num_clips) if self.shuffle else 1, rng)
        for k, group in enumerate(_chunks(samples, self.batch_size)):
            g = start + worker + k * workers
            yield g // self.batches_per_epoch, g % self.batches_per_epoch, self._batch(group, rng)

    def _draw_shards(self, rng: np.random.Generator):
        """Shards drawn with replacement: uniformly (sources in proportion to their shards), or a source
        by its mixing weight, then one of its shards."""
        if self.weights is None:
            while True:
                yield self.urls[rng.integers(len(self.urls))]
        p = np.asarray(self.weights) / np.sum(self.weights)
        while True:
            shards = self._source_urls[rng.choice(len(p), p=p)]
            yield shards[rng.integers(len(shards))]

    def _batch(self, group, rng: np.random.Generator) -> dict:
        c, b = self.channels, len(group)
        starts = self._window_starts(rng, b)
        frames = [slice(int(t), int(t) + self._frames()) for t in starts]
        if self.with_pred and any(s.pred_features is None for s in group):
            raise StoreError(
                f"a shard sample has no pred_features although its manifest says so: "
                f"{[s.clip_id for s in group if s.pred_features is None][:3]}"
            )
        arrays = {"features": [s.features[f, ..., :c] for s, f in zip(group, frames)]}
        if self.latents:
            arrays["latents"] = [s.latents for s in group]
        if self.with_pred:
            arrays["pred_features"] = [s.pred_features[..., :c] for s in group]
        batch = {k: self._stack(k, v) for k, v in arrays.items()}
        variants = self.manifest.get("variants", ["orig"])
        batch.update(
            clip=torch.full((b,), -1, dtype=torch.int64),
            clip_id=[s.clip_id for s in group],
            variant=torch.as_tensor(
                [variants.index(s.meta["variant"]) if s.meta.get("variant") in variants else 0 for s in group],
                dtype=torch.int64,
            ),
            skipped=self._pending_skips,
        )
        if self.window is not None:
            batch["window_start"] = torch.as_tensor(starts, dtype=torch.int64)
        self._pending_skips = 0
        return batch

    def _stack(self, name: str, arrays: list[np.ndarray]) -> torch.Tensor:
        out = self._buffer(name, (len(arrays), *arrays[0].shape))
        np.stack(arrays, out=out.numpy())
        return out


def shm_free() -> int | None:
    """Bytes free in /dev/shm, where DataLoader workers' batch tensors live (None: there is none)."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def _shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized float16 tensor in shared memory: a DataLoader worker hands it over by handle."""
    storage = torch.UntypedStorage._new_shared(2 * math.prod(shape))
    return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)


def _wrapped(plan: tuple[np.ndarray, ...], start: int):
    """The plan's (clip, variant, window start) from `start` on, wrapping around once."""
    n = len(plan[0])
    for j in range(start, start + n):
        yield tuple(a[j % n] for a in plan)


def _chunks(it, n: int):
    group = []
    for x in it:
        group.append(x)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _shuffled(it, buffer: int, rng: np.random.Generator):
    """A shuffle buffer: keep `buffer` samples, hand out a random one as each new one arrives."""
    pool = []
    for x in it:
        if len(pool) < buffer:
            pool.append(x)
            continue
        j = int(rng.integers(buffer))
        pool[j], x = x, pool[j]
        yield x
    rng.shuffle(pool)
    yield from pool


def make_loader(stream: ClipStream, workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream's batches: `workers` processes read ahead `prefetch_factor` batches
    each (the loop uses stream.batches(), which keeps the stream's position)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        collate_fn=_as_is,  # not default_convert: batches() turns a reused set's numpy arrays into tensors
    )


def _as_is(batch: dict) -> dict:
    return batch


def split_by_scene(store: Store, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) clip indices of one store: whole scenes from the end are held out until at
    least `holdout` clips are, so overlapping windows of one scene never fall on both sides. Returns
    an empty held-out set when that would leave no scene to train on."""
    scene_col = store.clip_table["scene"]
    scenes = np.array([str(scene_col[store.row(i)]) for i in range(len(store))])
    order = list(dict.fromkeys(scenes))
    held: list[str] = []
    while order and int(np.isin(scenes, held).sum()) < holdout:
        held.append(order.pop())
    if not order or holdout <= 0:
        return np.arange(len(store)), np.array([], np.int64)
    mask = np.isin(scenes, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)
