"""Opening a stream on sources: `open_stream` picks the reader for their format (pipeline/store/open.py),
`has_pred_features` says whether they hold Stage 1 rollouts, `split_by_scene` splits one store's clips
into training and held-out ones (pipeline/store/tables.py's `held_out_record` names the held-out
ones).
"""

from __future__ import annotations

import numpy as np

from pipeline.store.open import WEBDATASET, expand_shards, is_webdataset, source_format
from pipeline.store.reader import Store

from .stream import ClipStream
from .wds_stream import WebDatasetStream, _wds_manifest
from .zarr_stream import ZarrStream


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


VAL_SCENES = "val_scenes.json"  # in the run dir: the scenes held out without --val-store, for jobs.evaluate
