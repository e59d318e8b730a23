"""`ClipStream`: the torch IterableDataset the trainer streams batches of clips from, for one DDP rank and
its DataLoader workers; `ZarrStream` (zarr_stream.py) and `WebDatasetStream` (wds_stream.py) read them.

It yields whole per-rank batches at positions (epoch, batch), in the order order.py lays out.
`state_dict()` is the position of the next batch: (epoch, batch) and, for Zarr, `clips_done`, the clips
of the epoch's global order handed out before it (and the count of skipped clips); batches() keeps it
current in the training process whether the batches are read there or in DataLoader workers.

Damaged data (`DamagedStoreError` from the reader): `on_bad_clip="stop"` lets it through (the job
prints it as one line); `"skip"` logs the clip once, counts it in `skipped`, and fills its slot with
the next readable clip of the rank's epoch (training batches keep their size and count), or leaves
it out (evaluation); in a WebDataset, the rest of the damaged shard is skipped.

Every batch is a dict: features [B, 7, H, W, c] float16 (the first c PCA channels; [B, window, ...]
with a window, its first frame in window_start [B] int64; with channel_blocks, [B, 7, H, W, nb, k]
where the store's chunks allow it, see zarr_stream.py), latents [B, 16, 7, h, w] float16 (unless
latents=False), pred_features [B, 3, H, W, c] float16 when asked for (as stored; the loop casts them
to float32 on the device), clip [B] int64 (index into the concatenated stores; -1 for WebDataset),
variant [B] int64, clip_id (list of str), skipped (clips skipped while building it) and the batch's
position `epoch`, `batch` (ints). Arrays are decoded straight into the batch's tensors (buffers.py).
"""

from __future__ import annotations

import logging
import multiprocessing

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError
from pipeline.store.format import DamagedStoreError
from pipeline.store.geometry import Geometry
from pipeline.store.open import WEBDATASET

from . import buffers, mixing, order

log = logging.getLogger("re2pix.data")

ON_BAD_CLIP = ("stop", "skip")
MISSING_PRED = (
    "{where} has no finished clips/pred_features, and this run needs them (Stage 2 mixed "
    "supervision): run the rollout job on it first (make rollout), or set the mixing "
    "probability to 0"
)


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and the world size (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ClipStream(IterableDataset):
    """Batches of clips for one DDP rank (see the module doc); ZarrStream and WebDatasetStream read them.

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
        order.check_layout(batch_size, remainder, loop)
        if on_bad_clip not in ON_BAD_CLIP:
            raise ValueError(f"on_bad_clip must be one of {ON_BAD_CLIP}, got {on_bad_clip!r}")
        self.weights = mixing.checked_weights(weights, len(sources), loop)
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.sources, self.storage_options = list(sources), storage_options
        self.batch_size, self.with_pred, self.shuffle, self.seed = batch_size, with_pred, shuffle, seed
        self.window, self.latents = window, latents
        self.remainder, self.loop, self.on_bad_clip = remainder, loop, on_bad_clip
        self.layout = order.Layout(self.world, batch_size, remainder, resampled=self.kind == WEBDATASET)
        self.position = (0, 0)  # (epoch, batch) of the next batch to hand out
        # a resume under another layout (world size x batch) mid-epoch: (that epoch, clips of its global
        # order done before it); batch 0 of that epoch starts there
        self._resumed_at = order.NOT_RESUMED
        self.skipped = 0  # damaged clips skipped so far (on_bad_clip="skip")
        self._buffers = buffers.BufferSets()  # the batches' tensors and their reuse (batches(reuse=True))
        self.manifest, self.store_channels, self.num_clips = self._open_sources()
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        c = self.store_channels if channels is None else int(channels)
        if not 0 < c <= self.store_channels:  # a setting the data cannot serve: one line (ConfigError)
            raise ConfigError(
                f"asked for {channels} feature channels (--channels); the {self.kind} source holds "
                f"{self.store_channels}"
            )
        self.channels = c
        self.block = self._feature_block(c) if channel_blocks else None  # see zarr_stream.py
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
                self.dropped_per_epoch, self.num_clips, how, self.world, self.batches_per_epoch, batch_size,
            )  # fmt: skip

    # ---- what a reader provides ---------------------------------------------------------------------
    def _open_sources(self) -> tuple[dict, int, int]:
        """Check the sources; (manifest, feature channels they hold, clips per epoch)."""
        raise NotImplementedError

    def _batches(self, worker: int, workers: int):
        """(epoch, batch, batch dict) of this rank, from self.position on, for DataLoader worker `worker`."""
        raise NotImplementedError

    def _feature_block(self, c: int) -> int | None:
        """The channel block features can be read in straight from their files (zarr_stream.py), or None."""
        return None

    # ---- sizes and positions ----------------------------------------------------------------------
    def _plan_sizes(self) -> None:
        self.batches_per_epoch = order.count_batches(self.num_clips, self.layout)
        self.dropped_per_epoch = order.remainder_clips(self.num_clips, self.layout)  # drop: fewer than n; pad: more

    def _epoch_start(self, epoch: int) -> int:
        """Clips of the epoch's global order done before this stream's batch 0 of it (0 but after a resume
        under another layout)."""
        return order.epoch_start(self._resumed_at, epoch)

    def epoch_batches(self, epoch: int) -> int:
        """This rank's batches in an epoch: batches_per_epoch, or what is left of the epoch a resume under
        another layout landed in."""
        g = self._epoch_start(epoch)
        return self.batches_per_epoch if g == 0 else order.count_batches(self.num_clips - g, self.layout)

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at (epoch, batch), batches of this stream's layout from the epoch's start."""
        self._resumed_at = order.NOT_RESUMED
        if not 0 <= batch < self.epoch_batches(epoch):
            raise ValueError(f"batch {batch} out of range (epoch {epoch} has {self.epoch_batches(epoch)})")
        self.position = (int(epoch), int(batch))

    def advance(self, epoch: int, batch: int) -> tuple[int, int]:
        """The position after the batch at (epoch, batch)."""
        return order.advance(epoch, batch, self.epoch_batches(epoch))

    def clips_done(self) -> int:
        """Clips of the current epoch's global order handed out before the next batch (all ranks together)."""
        epoch, b = self.position
        return order.clips_done(self._epoch_start(epoch), b, self.layout)

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
        self._resumed_at, self.position = order.resume_position(epoch, done, self.num_clips, self.layout)

    def _record(self, batch: dict) -> None:
        self.position = self.advance(batch["epoch"], batch["batch"])
        self.skipped += batch["skipped"]

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch, b, batch in self._batches(worker, workers):
            batch.update(epoch=epoch, batch=b)
            batch = self._buffers.hand_over(batch)  # a worker's reused set: batches() rebuilds it and releases it
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
        Where /dev/shm cannot hold them all, workers prefetch fewer batches (buffers.fit_prefetch).
        The sets are made here before the workers start and reach each worker with the stream, so a
        batch in one crosses over as the set's number and sizes only (nothing to pass, map or copy)."""
        self._buffers.pin_memory = pin_memory
        if workers == 0:
            self._buffers.reuse_here(reuse)
            try:
                yield from self
            finally:
                self._buffers.pool = None
            return
        if reuse:
            shapes = self._batch_shapes(self.batch_size)  # pages are taken when first written, not here
            prefetch_factor = buffers.fit_prefetch(workers, prefetch_factor, shapes)
            self._buffers.make_sets(workers * (prefetch_factor + 2), shapes)
        try:
            for batch in make_loader(self, workers, prefetch_factor, pin_memory):
                self._record(batch)
                yield self._buffers.receive(batch, self._view)
        finally:
            self._buffers.drop_sets()

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

    def _frames(self) -> int:
        return self.geometry.latent_frames if self.window is None else self.window


def make_loader(stream: ClipStream, workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream's batches: `workers` processes read ahead `prefetch_factor` batches
    each (the loop uses stream.batches(), which keeps the stream's position). The workers start from a
    fork server (worker_context), not by forking this process."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        collate_fn=_as_is,  # not default_convert: batches() turns a reused set's numpy arrays into tensors
        multiprocessing_context=worker_context() if workers > 0 else None,
    )


# what the fork server imports once, so that each worker starts with them in place
WORKER_PRELOAD = ["torch", "model.data.stream", "model.data.zarr_stream", "model.data.wds_stream"]


def worker_context():
    """The start method of the DataLoader workers: "forkserver" where there is one (Linux, macOS).

    A plain fork copies this process with its threads' locks as they stand (zarr's and fsspec's event
    loops, tensorstore's and OpenMP's pools, a codec's), so a worker could start holding a lock
    no thread will ever release and wait forever, its parent waiting for its batches; and it would
    inherit the job's SIGTERM handler and every open file of the job. A worker forked from the fork
    server (a single-threaded process with these modules imported) starts clean; the stream reaches it
    pickled, its shared-memory batch sets as file descriptors."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # Windows: spawn, the default there
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts (once per process)
    return context


def _as_is(batch: dict) -> dict:
    return batch
