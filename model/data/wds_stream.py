"""`WebDatasetStream`: batches from WebDataset exports (a folder/URL with `manifest.json` from
`export_webdataset`, or shard paths/brace patterns beside one).

Tar shards cannot seek, so each rank and worker draws shards at random with replacement ("resampled")
into a shuffle buffer, an endless stream of which every rank takes the same number of batches per
nominal epoch. Resuming reseeds the stream from the position: the batches after a resume are
reproducible but not those an uninterrupted run would have seen. Flip variants are separate samples
there. With mixing weights, each draw picks a source by its weight, then one of its shards (mixing.py).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.store.format import DamagedStoreError, StoreError, check_compatible
from pipeline.store.open import WEBDATASET, expand_shards
from pipeline.store.wds import manifest_shapes

from .mixing import draw_shards
from .order import window_starts
from .stream import MISSING_PRED, ClipStream


def _wds_manifest(folder: str, storage_options: dict | None = None) -> dict:
    from pipeline.store.wds import read_wds_manifest

    return read_wds_manifest(folder, storage_options)


class WebDatasetStream(ClipStream):
    """Batches from WebDataset shards, resampled (see the module doc). shuffle_buffer: samples held to
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
        resampled = self._samples(draw_shards(rng, self.urls, self._source_urls, self.weights))
        # a buffer larger than the sources would read them whole, several times over, before the first batch
        samples = _shuffled(resampled, min(self.shuffle_buffer, self.num_clips) if self.shuffle else 1, rng)
        for k, group in enumerate(_chunks(samples, self.batch_size)):
            g = start + worker + k * workers
            yield g // self.batches_per_epoch, g % self.batches_per_epoch, self._batch(group, rng)

    def _batch(self, group, rng: np.random.Generator) -> dict:
        c, b = self.channels, len(group)
        starts = window_starts(rng, b, self.window, self.geometry.latent_frames)
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
        out = self._buffers.tensor(name, (len(arrays), *arrays[0].shape))
        np.stack(arrays, out=out.numpy())
        return out


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
