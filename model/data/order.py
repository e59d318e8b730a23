"""The order of an epoch's clips and its split over ranks and resumes: pure functions of the seed, the
epoch and the layout (W ranks x a per-rank batch of B clips), so that the order of a stream's batches is
a function of (seed, epoch, rank) and not of how many DataLoader workers read them.

- Epoch order (`epoch_order`, Zarr stores): each epoch has one global order of clips, a function of the
  seed and the epoch only: a permutation of all clips, or with mixing weights the epoch's mix of the
  stores (mixing.py) shuffled together; each clip's flip variant and window start are drawn with it.
- Rank split (`rank_indices`): only then is the order split: global batch b is clips [b*W*B, (b+1)*W*B)
  of it, of which rank r of W takes every W-th; worker w of a DataLoader builds every nw-th batch (the
  DataLoader hands batches out round-robin, which restores the order). Every rank gets the same number
  of batches (`count_batches`): the remainder is dropped (`remainder="drop"`, other clips each epoch
  since the order changes) or filled by repeating the start of the epoch's order (`"pad"`); `"keep"`
  keeps the uneven tail for evaluation and rollouts, where no collective runs per batch.
- Resume (`resume_position`): a resumed stream continues with exactly the batches an uninterrupted run
  would have seen; its position is global (clips of the epoch's order done), so a run stopped at W
  ranks resumes at W' ranks (or another per-rank batch) with the rest of the epoch's order split over
  the new ranks: no clip of the epoch repeated or skipped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

REMAINDERS = ("drop", "pad", "keep")
NOT_RESUMED = (-1, 0)  # no resume under another layout: every epoch's batch 0 starts at its order's start


class Layout(NamedTuple):
    """How an epoch's order is handed out: `world` ranks x `batch_size` clips per rank and batch, what
    becomes of the clips that do not fill a last batch (REMAINDERS), and whether the epoch is nominal
    (`resampled`: a WebDataset stream, which has no remainder to pad)."""

    world: int
    batch_size: int
    remainder: str
    resampled: bool = False

    @property
    def per_batch(self) -> int:
        """Clips of the epoch's global order one batch position takes (all ranks together)."""
        return self.world * self.batch_size


def check_layout(batch_size: int, remainder: str, loop: bool) -> None:
    """A ValueError for a per-rank batch or a remainder a stream cannot lay out."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if remainder == "keep" and loop:
        raise ValueError('remainder="keep" gives ranks uneven batch counts: only for loop=False')


def count_batches(n: int, layout: Layout) -> int:
    """Batches per rank that n clips of an epoch's order make under the layout."""
    w, b = layout.world, layout.batch_size
    if layout.remainder == "keep":  # uneven, for evaluation: rank 0 has the most
        return math.ceil(math.ceil(n / w) / b)
    if layout.remainder == "pad" and not layout.resampled:
        return math.ceil(max(n, 0) / (w * b))
    return max(n, 0) // (w * b)  # drop (a resampled WebDataset stream has no remainder: its epoch is nominal)


def remainder_clips(n: int, layout: Layout) -> int:
    """Clips of an epoch of n dropped ("drop": fewer than n used) or repeated ("pad": more) so that every
    rank gets the same number of batches; 0 for "keep"."""
    used = count_batches(n, layout) * layout.per_batch
    return 0 if layout.remainder == "keep" else abs(n - used)


def epoch_start(resumed_at: tuple[int, int], epoch: int) -> int:
    """Clips of the epoch's global order done before batch 0 of it: 0 but in the epoch a resume under
    another layout landed in (resumed_at: that epoch and the clips of its order done before it)."""
    return resumed_at[1] if epoch == resumed_at[0] else 0


def advance(epoch: int, batch: int, batches: int) -> tuple[int, int]:
    """The position after the batch at (epoch, batch), in an epoch of `batches` batches."""
    return (epoch + 1, 0) if batch + 1 >= batches else (epoch, batch + 1)


def clips_done(start: int, batch: int, layout: Layout) -> int:
    """Clips of the epoch's global order handed out before its batch `batch` (all ranks together),
    `start` of them before its batch 0."""
    return start + batch * layout.per_batch


def resume_position(epoch: int, done: int, n: int, layout: Layout) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a stream of n clips per epoch continues the epoch's global order after its first `done`
    clips, whatever layout handed them out: (resumed_at, position of the next batch). On a batch boundary
    of this layout that is an ordinary position; else batch 0 of the epoch starts there (resumed_at);
    with too little left for one batch of this layout, the next epoch."""
    if done % layout.per_batch == 0:  # on a batch boundary of this layout: an ordinary position
        resumed_at, position = NOT_RESUMED, (epoch, done // layout.per_batch)
    else:
        resumed_at, position = (epoch, done), (epoch, 0)
    if position[1] >= count_batches(n - epoch_start(resumed_at, epoch), layout):  # too little left
        position = (epoch + 1, 0)
    return resumed_at, position


def window_starts(rng: np.random.Generator, n: int, window: int | None, frames: int) -> np.ndarray:
    """n window starts of `window` consecutive frames of `frames` (0 without a window: the whole clip)."""
    if window is None:
        return np.zeros(n, np.int64)
    return rng.integers(0, frames - window + 1, n)


def epoch_order(
    base: np.ndarray,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    offsets: np.ndarray,
    store_variants: np.ndarray,
    random_variant: bool,
    window: int | None,
    frames: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epoch's global (clips, variants, window starts), a function of the seed and the epoch only:
    `base` (clip indices into the concatenated stores, or the epoch's weighted mix) permuted, a flip
    variant per clip (of its store's store_variants; stores start at offsets) when random_variant, else
    the original, and a window start per clip."""
    rng = np.random.default_rng([seed, epoch])
    order = base[rng.permutation(len(base))] if shuffle else base
    nv = store_variants[np.searchsorted(offsets, order, side="right") - 1]
    variants = (rng.random(len(order)) * nv).astype(np.int64) if random_variant else np.zeros(len(order), np.int64)
    return order, variants, window_starts(rng, len(order), window, frames)


def rank_indices(n: int, rank: int, layout: Layout, start: int, batches: int) -> np.ndarray:
    """The positions in an epoch's order of n clips that rank `rank` reads, in batch order: global batch b
    is clips [start + b*W*B, start + (b+1)*W*B) of it (start: epoch_start), rank r takes every W-th, for
    `batches` batches. drop: the epoch's rest is cut to whole batches; pad: wraps around to the start of
    the order; keep: every W-th clip of the whole order."""
    w = layout.world
    if layout.remainder == "keep":
        return np.arange(rank, n, w)
    used = batches * layout.per_batch
    return (start + np.arange(used))[rank::w] % n


def wrapped(plan: tuple[np.ndarray, ...], start: int):
    """The plan's (clip, variant, window start) from `start` on, wrapping around once."""
    n = len(plan[0])
    for j in range(start, start + n):
        yield tuple(a[j % n] for a in plan)
