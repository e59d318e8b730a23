"""Streaming training clips from stores: Zarr stores (random access) or WebDataset exports (shards).

A `ClipStream` (stream.py) is an IterableDataset that yields whole per-rank batches at positions
(epoch, batch), so that the order of batches is a pure function of (seed, epoch, rank) and not of how
many DataLoader workers read them. `open_stream` (sources.py) picks the reader for the sources' format:
`ZarrStream` (zarr_stream.py: one global order of clips per epoch, split over ranks and resumed at any
world size, order.py) or `WebDatasetStream` (wds_stream.py: shards drawn with replacement). mixing.py
mixes several sources by weight; buffers.py holds the tensors batches are decoded into and reuses them.

Example (in a script, under `if __name__ == "__main__":`: the workers start from a fork server, which
runs the script's top level again in each of them, as Python's spawn does):
    stream = open_stream(["a.zarr", "b.zarr"], batch_size=8, channels=256, seed=0, weights=[0.7, 0.3])
    for batch in stream.batches(workers=4, pin_memory=True): ...
"""

from .buffers import SHM, ShmError, shm_free
from .mixing import apportion, parse_store_list
from .order import REMAINDERS
from .sources import VAL_SCENES, has_pred_features, open_stream, split_by_scene
from .stream import MISSING_PRED, ON_BAD_CLIP, ClipStream, make_loader, rank_and_world
from .wds_stream import WebDatasetStream
from .zarr_stream import ZarrStream

__all__ = [
    "MISSING_PRED",
    "ON_BAD_CLIP",
    "REMAINDERS",
    "SHM",
    "VAL_SCENES",
    "ClipStream",
    "ShmError",
    "WebDatasetStream",
    "ZarrStream",
    "apportion",
    "has_pred_features",
    "make_loader",
    "open_stream",
    "parse_store_list",
    "rank_and_world",
    "shm_free",
    "split_by_scene",
]
