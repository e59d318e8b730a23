"""Mixing several sources by weight: a `--store` list's mixing weights (`a.zarr:0.5,b.zarr:0.5`,
`parse_store_list`) and the draws they steer (training, loop=True).

- Zarr stores (`mixed_epoch`): an epoch holds as many clips as the stores hold together, store k
  supplying its share w_k / sum(w) of them (`apportion`), drawn without replacement from an endless
  sequence of permutations of its own clips (so across epochs a down-weighted store shows every clip
  before any repeats); the epoch's order (order.py) then shuffles them together.
- WebDataset sources (`draw_shards`): each draw picks a source by its weight, then one of its shards.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.store.format import StoreError

_MIX = 0x6D6978  # keeps the mixing draws' seeds apart from the epochs' ([seed, epoch])


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


def checked_weights(weights, sources: int, loop: bool) -> list[float] | None:
    """One mixing weight per source as floats (None: sources in proportion to their clips); a ValueError
    for a wrong count, a weight that is not a positive number, or weights on a stream that reads every
    clip once (loop=False)."""
    if weights is not None:
        weights = [float(x) for x in weights]
        if len(weights) != sources:
            raise ValueError(f"{len(weights)} mixing weights for {sources} sources")
        if not all(math.isfinite(x) and x > 0 for x in weights):
            raise ValueError(f"mixing weights must be positive numbers, got {weights}")
        if not loop:
            raise ValueError("mixing weights draw training epochs (loop=True); evaluation reads every clip once")
    return weights


def apportion(weights, n: int) -> np.ndarray:
    """n clips split in proportion to `weights` (largest remainders, ties to the earlier store)."""
    share = np.asarray(weights, np.float64) / np.sum(weights) * n
    counts = np.floor(share).astype(np.int64)
    rest = int(n - counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    return counts


def store_parts(clips: np.ndarray, offsets: np.ndarray, stores: int) -> list[np.ndarray]:
    """Each store's clips of `clips` (indices into the concatenated stores, which start at offsets)."""
    store_of = np.searchsorted(offsets, clips, side="right") - 1
    return [clips[store_of == k] for k in range(stores)]


def mixed_epoch(parts: list[np.ndarray], weights, n: int, epoch: int, *, seed: int, shuffle: bool) -> np.ndarray:
    """An epoch of the weighted mix of n clips, before shuffling: store k's share n_k of n, positions
    epoch*n_k on of an endless sequence of permutations of its clips parts[k] (cycle j drawn from seed, k, j)."""
    out = []
    for k, (clips, share) in enumerate(zip(parts, apportion(weights, n))):
        size, lo = len(clips), epoch * int(share)
        first, stop = lo // size, -(-(lo + share) // size)  # the cycles that positions lo .. lo+share-1 fall in
        cycles = [clips[cycle(k, j, size, seed=seed, shuffle=shuffle)] for j in range(first, stop)]
        out.append(np.concatenate([clips[:0], *cycles])[lo - first * size :][:share])
    return np.concatenate(out)


def cycle(store: int, j: int, size: int, *, seed: int, shuffle: bool) -> np.ndarray:
    """Permutation j of the endless sequence of store `store`'s `size` clips (in order without shuffle)."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, store, j, _MIX]).permutation(size)


def draw_shards(rng: np.random.Generator, urls: list[str], source_urls: list[list[str]], weights):
    """Shards drawn with replacement: uniformly from `urls` (sources in proportion to their shards), or a
    source by its mixing weight, then one of its shards (source_urls: each source's)."""
    if weights is None:
        while True:
            yield urls[rng.integers(len(urls))]
    p = np.asarray(weights) / np.sum(weights)
    while True:
        shards = source_urls[rng.choice(len(p), p=p)]
        yield shards[rng.integers(len(shards))]
