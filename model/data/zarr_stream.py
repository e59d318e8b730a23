"""`ZarrStream`: batches from Zarr stores by random access, in each epoch's global order (order.py; with
mixing weights, the epoch's mix of the stores, mixing.py), split over ranks and DataLoader workers.

channel_blocks (the training loop asks for it): a store whose features are read directly (uncompressed,
local) keeps each frame's channels in chunks of k (128) channels, [H, W, k] each. Putting them side by
side into [H, W, c] rows on the CPU is a second pass over every byte after the file read (about as
costly as the read itself). With channel_blocks a batch's features are a view [B, F, H, W, nb, k] of
memory laid out [B, F, nb, H, W, k], into which each chunk is read straight from its file; the loop's
to_device (model/runtime.py) moves it to the device as it is and lays the channels side by side there,
in the same pass that makes them float32. Where the store cannot (compressed or remote stores, a
channel count that is not whole chunks, WebDataset) features stay [B, F, H, W, c]: `block` is None.
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import torch

from pipeline.store.format import VARIANT_SUFFIX, DamagedStoreError, StoreError
from pipeline.store.reader import Store, open_stores

from . import order
from .mixing import mixed_epoch, store_parts
from .stream import MISSING_PRED, ClipStream

log = logging.getLogger("re2pix.data")


class ZarrStream(ClipStream):
    """Batches from Zarr stores by random access (see the module doc). clips: indices into the
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
            self._parts = store_parts(self.clips, self.offsets, len(stores))
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
        base = self.clips
        if self.weights is not None:
            base = mixed_epoch(self._parts, self.weights, self.num_clips, epoch, seed=self.seed, shuffle=self.shuffle)
        return order.epoch_order(
            base,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            offsets=self.offsets,
            store_variants=self.store_variants,
            random_variant=self.random_variant,
            window=self.window,
            frames=self.geometry.latent_frames,
        )

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (clips, variants, window starts) for an epoch, in batch order: global batch b of the
        epoch is clips [g + b*W*B, g + (b+1)*W*B) of its order (g: _epoch_start), rank r takes every W-th."""
        clips, variants, starts = self.epoch_order(epoch)
        idx = order.rank_indices(
            len(clips), self.rank, self.layout, self._epoch_start(epoch), self.epoch_batches(epoch)
        )
        return clips[idx], variants[idx], starts[idx]

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
                spare = order.wrapped(plan, stop) if self.loop else ()
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
        buffers = {name: self._buffers.tensor(name, shape) for name, shape in self._batch_shapes(len(clips)).items()}
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
