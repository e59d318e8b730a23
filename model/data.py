"""Streaming training clips from stores: Zarr stores (random access) or WebDataset exports (shards).

`ClipStream` is an IterableDataset that yields whole per-rank batches, so that the order of batches is
a pure function of (seed, epoch, rank) and not of how many DataLoader workers read them:

- **Zarr**: each epoch is a permutation of all clips drawn from seed + epoch; rank r of W takes every
  W-th clip of it; worker w of a DataLoader builds every nw-th batch (the DataLoader hands batches
  out round-robin, which restores the order). Every rank gets the same number of batches: the
  remainder is dropped (`remainder="drop"`, other clips each epoch since the order changes) or filled
  by repeating the start of the epoch's permutation (`"pad"`); `"keep"` keeps the uneven tail for
  evaluation and rollouts, where no collective runs per batch. Resume with `set_position(epoch,
  batch)`: the stream continues with exactly the batches an uninterrupted run would have seen.
- **WebDataset** (a folder/URL with `manifest.json` from `export_webdataset`, or shard paths/brace
  patterns beside one): tar shards cannot seek, so each rank and worker draws shards at random with
  replacement ("resampled") into a shuffle buffer, an endless stream of which every rank takes the
  same number of batches per nominal epoch. Resuming reseeds the stream from the position: the
  batches after a resume are reproducible but not those an uninterrupted run would have seen. Flip
  variants are separate samples there.

Every batch is a dict: features [B, 7, H, W, c] float16 (the first c PCA channels), latents
[B, 16, 7, h, w] float16, pred_features [B, 3, H, W, c] float16 when asked for (as stored; the loop
casts them to float32 on the device), clip [B] int64
(index into the concatenated stores; -1 for WebDataset), variant [B] int64, clip_id (list of str),
and the batch's position `epoch`, `batch` (ints).

Example:
    stream = ClipStream(["a.zarr", "b.zarr"], batch_size=8, channels=256, seed=0)
    loader = make_loader(stream, workers=4, pin_memory=True)
    for batch in loader: ...
"""

from __future__ import annotations

import logging
import math
import os
import posixpath

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.store.format import VARIANT_SUFFIX, StoreError, check_compatible
from pipeline.store.location import filesystem
from pipeline.store.reader import Store, open_stores

log = logging.getLogger("re2pix.data")

REMAINDERS = ("drop", "pad", "keep")
MISSING_PRED = ("{where} has no finished clips/pred_features, and this run needs them (Stage 2 mixed "
                "supervision): run the rollout job on it first (make rollout), or set the mixing "
                "probability to 0")


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and the world size (0, 1 outside torch.distributed)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_webdataset(location: str, storage_options: dict | None = None) -> bool:
    """A WebDataset export (shard paths, brace patterns, or a folder with manifest.json, no zarr.json)."""
    if location.endswith(".tar") or "{" in location:
        return True
    fs, root = filesystem(location, storage_options)
    return not fs.exists(f"{root}/zarr.json") and fs.exists(f"{root}/manifest.json")


def expand_shards(location: str) -> tuple[str, list[str]]:
    """(folder holding manifest.json, shard URLs) of one WebDataset source."""
    from pipeline.store.wds import shard_urls
    if location.endswith(".tar") or "{" in location:
        import braceexpand
        return posixpath.dirname(location.rstrip("/")), list(braceexpand.braceexpand(location))
    return location.rstrip("/"), shard_urls(location)


def _read_manifest(folder: str) -> dict:
    from pipeline.store.wds import read_wds_manifest
    return read_wds_manifest(folder)


def has_pred_features(sources, storage_options: dict | None = None) -> bool:
    """Whether every source holds finished Stage 1 rollouts (Zarr) or exported them (WebDataset)."""
    for s in [sources] if isinstance(sources, str) else sources:
        if is_webdataset(s, storage_options):
            if not _read_manifest(expand_shards(s)[0])["webdataset"].get("has_pred_features"):
                return False
        elif not Store(s, storage_options).has_pred_features:
            return False
    return True


class ClipStream(IterableDataset):
    """Batches of clips for one DDP rank, from Zarr stores or WebDataset shards (see module doc).

    batch_size is per rank (one micro-batch). channels: read only the first c PCA channels (None:
    all). with_pred: also read Stage 1 rollouts (clear error if a source has none). clips: indices
    into the concatenated Zarr stores to draw from (a train/val split); None: all. loop: repeat over
    epochs forever (training) or stop after one epoch (evaluation, rollouts).
    """

    def __init__(self, sources, *, batch_size: int, channels: int | None = None, with_pred: bool = False,
                 shuffle: bool = True, seed: int = 0, random_variant: bool = True, clips=None,
                 remainder: str = "drop", loop: bool = True, rank: int | None = None, world: int | None = None,
                 storage_options: dict | None = None, shuffle_buffer: int = 256):
        sources = [sources] if isinstance(sources, str) else [str(s) for s in sources]
        if not sources:
            raise ValueError("ClipStream needs at least one store or WebDataset source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if remainder == "keep" and loop:
            raise ValueError('remainder="keep" gives ranks uneven batch counts: only for loop=False')
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.sources, self.storage_options = sources, storage_options
        self.batch_size, self.with_pred, self.shuffle, self.seed = batch_size, with_pred, shuffle, seed
        self.random_variant, self.remainder, self.loop = random_variant, remainder, loop
        self.shuffle_buffer = shuffle_buffer
        self.position = (0, 0)  # (epoch, batch) of the next batch to yield
        kinds = {is_webdataset(s, storage_options) for s in sources}
        if len(kinds) > 1:
            raise ValueError("cannot mix Zarr stores and WebDataset shards in one stream: "
                             f"{sources}")
        self.webdataset = kinds.pop()
        self._stores = None
        self._pid = os.getpid()
        if self.webdataset:
            self._init_webdataset(channels)
        else:
            self._init_zarr(channels, clips)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{self.num_clips} clips cannot fill one batch of {batch_size} on each of "
                             f"{self.world} ranks: use a smaller batch or more clips")
        if self.rank == 0 and self.dropped_per_epoch:
            how = "dropped" if remainder == "drop" else "repeated (resampled)"
            log.warning("ClipStream: %d of %d clips per epoch are %s so that each of %d ranks gets %d "
                        "batches of %d", self.dropped_per_epoch, self.num_clips, how, self.world,
                        self.batches_per_epoch, batch_size)

    # ---- set-up ---------------------------------------------------------------------------------
    def _init_zarr(self, channels, clips) -> None:
        stores = open_stores(self.sources, self.storage_options)
        self.manifest = stores[0].manifest
        self.geometry = stores[0].geometry
        self.store_channels = stores[0].num_channels
        self.channels = self._check_channels(channels, self.store_channels, "the store")
        if self.with_pred:
            for s in stores:
                if not s.has_pred_features:
                    raise StoreError(MISSING_PRED.format(where=s.location))
        self.sizes = np.array([len(s) for s in stores])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.store_variants = np.array([s.num_variants for s in stores])
        total = int(self.offsets[-1])
        self.clips = np.arange(total) if clips is None else np.asarray(clips, dtype=np.int64)
        if self.clips.size and (self.clips.min() < 0 or self.clips.max() >= total):
            raise IndexError(f"clip indices must be in 0..{total - 1}")
        self.num_clips = len(self.clips)
        self.pred_channels = [s.group["clips/pred_features"].attrs.get("channels", s.num_channels)
                              for s in stores] if self.with_pred else []
        if self.with_pred and min(self.pred_channels) < self.channels:
            log.warning("ClipStream: rollouts hold %d predicted channels (the rest are zero) but %d are "
                        "read", min(self.pred_channels), self.channels)
        self._stores, self._pid = stores, os.getpid()
        self._plan_sizes()

    def _init_webdataset(self, channels) -> None:
        folders, urls, manifests = [], [], []
        for s in self.sources:
            folder, shards = expand_shards(s)
            folders.append(folder)
            urls += shards
            manifests.append(_read_manifest(folder))
        check_compatible(manifests, folders)
        self.manifest = manifests[0]
        from pipeline.store.geometry import Geometry
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        self.store_channels = min(m["webdataset"]["channels"] for m in manifests)
        self.channels = self._check_channels(channels, self.store_channels, "the WebDataset export")
        if self.with_pred:
            for m, folder in zip(manifests, folders):
                if not m["webdataset"].get("has_pred_features"):
                    raise StoreError(MISSING_PRED.format(where=folder) + " (then export the shards again)")
        self.urls = urls
        self.num_clips = sum(m["webdataset"]["samples"] for m in manifests)  # rows: variants count apart
        self._plan_sizes()

    def _check_channels(self, channels, available: int, what: str) -> int:
        c = available if channels is None else int(channels)
        if not 0 < c <= available:
            raise ValueError(f"asked for {channels} feature channels; {what} holds {available}")
        return c

    def _plan_sizes(self) -> None:
        n, w, b = self.num_clips, self.world, self.batch_size
        if self.remainder == "keep":  # uneven, for evaluation: rank 0 has the most
            self.batches_per_epoch = math.ceil(math.ceil(n / w) / b)
            self.dropped_per_epoch = 0
        elif self.remainder == "pad" and not self.webdataset:
            self.batches_per_epoch = math.ceil(n / (w * b))
            self.dropped_per_epoch = self.batches_per_epoch * w * b - n
        else:  # drop (a resampled WebDataset stream has no remainder to pad: its epoch is nominal)
            self.batches_per_epoch = n // (w * b)
            self.dropped_per_epoch = n - self.batches_per_epoch * w * b

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stores"] = None  # each process opens its own handles
        return state

    # ---- positions --------------------------------------------------------------------------------
    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at (epoch, batch): the resume point of a checkpoint."""
        if not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"batch {batch} out of range (an epoch has {self.batches_per_epoch})")
        self.position = (int(epoch), int(batch))

    def advance(self, epoch: int, batch: int) -> tuple[int, int]:
        """The position after the batch at (epoch, batch)."""
        return (epoch + 1, 0) if batch + 1 >= self.batches_per_epoch else (epoch, batch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.position[0], "batch": self.position[1], "seed": self.seed,
                "batches_per_epoch": self.batches_per_epoch, "webdataset": self.webdataset}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches_per_epoch") not in (None, self.batches_per_epoch):
            log.warning("ClipStream: the checkpoint's epochs had %s batches, this stream's have %d (other "
                        "stores, batch size or world size): resuming at the same epoch, batch index",
                        state["batches_per_epoch"], self.batches_per_epoch)
            self.position = (int(state["epoch"]), min(int(state["batch"]), self.batches_per_epoch - 1))
            return
        self.set_position(state["epoch"], state["batch"])

    # ---- the Zarr plan ------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (clips, variants) for an epoch, in batch order (Zarr stores)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self.clips[rng.permutation(self.num_clips)] if self.shuffle else self.clips
        nv = self.store_variants[np.searchsorted(self.offsets, order, side="right") - 1]
        variants = ((rng.random(len(order)) * nv).astype(np.int64) if self.random_variant
                    else np.zeros(len(order), np.int64))
        w, r = self.world, self.rank
        if self.remainder == "keep":
            idx = np.arange(r, len(order), w)
        else:
            used = self.batches_per_epoch * w * self.batch_size
            idx = np.resize(np.arange(len(order)), used)[r::w]  # drop: first `used`; pad: wraps around
        return order[idx], variants[idx]

    def _open(self) -> list[Store]:
        if self._stores is None or self._pid != os.getpid():
            self._stores = [Store(s, self.storage_options) for s in self.sources]
            self._pid = os.getpid()
        return self._stores

    def read_batch(self, clips: np.ndarray, variants: np.ndarray) -> dict:
        stores = self._open()
        which = np.searchsorted(self.offsets, clips, side="right") - 1
        feats, lats, preds, ids = [], [], [], []
        for g, k, v in zip(clips, which, variants):
            store, i, v = stores[k], int(g - self.offsets[k]), int(v)
            feats.append(store.read_features(i, channels=self.channels, variant=v))  # [7, H, W, c]
            lats.append(store.read_latents(i, variant=v))  # [16, 7, h, w]
            if self.with_pred:
                preds.append(store.read_pred_features(i, channels=self.channels, variant=v))  # [3, H, W, c]
            ids.append(store.clip_ids[i] + VARIANT_SUFFIX[store.variants[v]])
        batch = {"features": _tensor(feats), "latents": _tensor(lats),
                 "clip": torch.as_tensor(clips, dtype=torch.int64),
                 "variant": torch.as_tensor(variants, dtype=torch.int64), "clip_id": ids}
        if self.with_pred:
            batch["pred_features"] = _tensor(preds)
        return batch

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        source = self._iter_webdataset if self.webdataset else self._iter_zarr
        for epoch, b, batch in source(worker, workers):
            batch.update(epoch=epoch, batch=b)
            yield batch

    def _positions(self):
        epoch, b = self.position
        while True:
            yield epoch, b
            epoch, b = self.advance(epoch, b)
            if b == 0 and not self.loop:
                return

    def _iter_zarr(self, worker: int, workers: int):
        plan_epoch, plan = None, None
        for k, (epoch, b) in enumerate(self._positions()):
            if k % workers != worker:
                continue
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, self.epoch_plan(epoch)
            clips, variants = plan
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if len(clips[sl]) == 0:  # "keep": a rank with fewer clips has run out
                return
            yield epoch, b, self.read_batch(clips[sl], variants[sl])

    def _iter_webdataset(self, worker: int, workers: int):
        from pipeline.store.wds import iter_shard
        epoch, b = self.position
        start = epoch * self.batches_per_epoch + b
        if not self.loop:  # evaluation: every shard once, in order, split over ranks and workers
            urls = self.urls[self.rank::self.world][worker::workers]
            samples = (s for u in urls for s in iter_shard(u))
            for j, group in enumerate(_chunks(samples, self.batch_size)):
                yield 0, j, self._wds_batch(group)
            return
        rng = np.random.default_rng([self.seed, start, self.rank, worker])

        def resampled():
            while True:
                yield from iter_shard(self.urls[rng.integers(len(self.urls))])

        samples = _shuffled(resampled(), self.shuffle_buffer if self.shuffle else 1, rng)
        for k, group in enumerate(_chunks(samples, self.batch_size)):
            g = start + worker + k * workers
            yield g // self.batches_per_epoch, g % self.batches_per_epoch, self._wds_batch(group)

    def _wds_batch(self, group) -> dict:
        c = self.channels
        batch = {"features": _tensor([s.features[..., :c] for s in group]),
                 "latents": _tensor([s.latents for s in group]),
                 "clip": torch.full((len(group),), -1, dtype=torch.int64),
                 "variant": torch.as_tensor([self._variant_index(s.meta) for s in group], dtype=torch.int64),
                 "clip_id": [s.clip_id for s in group]}
        if self.with_pred:
            if any(s.pred_features is None for s in group):
                raise StoreError(f"a shard sample has no pred_features although its manifest says so: "
                                 f"{[s.clip_id for s in group if s.pred_features is None][:3]}")
            batch["pred_features"] = _tensor([s.pred_features[..., :c] for s in group])
        return batch

    def _variant_index(self, meta: dict) -> int:
        variants = self.manifest.get("variants", ["orig"])
        return variants.index(meta["variant"]) if meta.get("variant") in variants else 0

    def describe(self) -> dict:
        kind = "webdataset" if self.webdataset else "zarr"
        return {"kind": kind, "sources": self.sources, "clips": self.num_clips, "channels": self.channels,
                "with_pred": self.with_pred, "batch_size": self.batch_size, "rank": self.rank, "world": self.world,
                "batches_per_epoch": self.batches_per_epoch, "remainder": self.remainder,
                "remainder_clips_per_epoch": self.dropped_per_epoch}


def _tensor(arrays) -> torch.Tensor:
    # stays float16 as stored: half the bytes to copy to the GPU; loop.to_device casts to float32
    # there (the conversion on the CPU was a third of the loader's time)
    return torch.from_numpy(np.stack(arrays))


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


def make_loader(stream: ClipStream, workers: int = 0, prefetch_factor: int = 2,
                pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over a ClipStream's batches: `workers` processes read ahead `prefetch_factor`
    batches each; memory is pinned for fast host-to-GPU copies when CUDA is available."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                      prefetch_factor=prefetch_factor if workers > 0 else None)


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

