"""WebDataset export of a store, for sequential streaming: one self-contained tar sample per clip row.

A sample `{clip_id}` holds `{clip_id}.latents.npy` [16, 7, h, w], `{clip_id}.features.npy`
[7, H, W, c] (optionally only the first c channels), `{clip_id}.pred_features.npy` when the store has
rollouts, and `{clip_id}.json` (its metadata). A `manifest.json` beside the shards carries the store's
manifest so readers can refuse incompatible shards. Arrays are .npy read with allow_pickle=False.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np

from .format import StoreError, check_manifest
from .location import filesystem, is_url, write_atomic
from .reader import ClipArrays, Store

SHARD_PATTERN = "shard-%06d.tar"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def export_webdataset(store: Store, out_dir: str, channels: int | None = None,
                      shard_size_mb: float = 300.0, progress: bool = True) -> list[str]:
    """Write every valid clip row of `store` into tar shards of about `shard_size_mb` under `out_dir`."""
    import webdataset as wds
    from tqdm.auto import tqdm

    fs, root = filesystem(out_dir)
    fs.makedirs(root, exist_ok=True)
    c = store.num_channels if channels is None else channels
    with_pred = store.has_pred_features
    pattern = f"{root}/{SHARD_PATTERN}"
    count = 0
    with wds.ShardWriter(pattern, maxsize=int(shard_size_mb * 2**20), maxcount=10**9, verbose=0) as sink:
        for i in tqdm(range(len(store)), desc="export", unit="clip", disable=not progress):
            for v in range(store.num_variants):
                clip = store.read_clip(i, channels=c, variant=v, with_pred=with_pred)
                sample = {"__key__": clip.clip_id, "latents.npy": _npy(clip.latents),
                          "features.npy": _npy(clip.features), "json": json.dumps(clip.meta).encode()}
                if with_pred:
                    sample["pred_features.npy"] = _npy(clip.pred_features)
                sink.write(sample)
                count += 1
        shards = [posixpath.basename(p) for p in sorted(fs.glob(f"{root}/shard-*.tar"))]
    manifest = dict(store.manifest, webdataset={"channels": c, "shards": shards, "samples": count,
                                                "source_store": store.location, "has_pred_features": with_pred})
    write_atomic(fs, f"{root}/manifest.json", json.dumps(manifest, indent=1).encode())
    return [f"{out_dir.rstrip('/')}/{s}" for s in shards]


def read_wds_manifest(out_dir: str) -> dict:
    fs, root = filesystem(out_dir)
    path = f"{root}/manifest.json"
    if not fs.exists(path):
        raise StoreError(f"{out_dir} has no manifest.json: not a re2pix WebDataset export")
    manifest = json.loads(fs.cat_file(path))
    check_manifest(manifest, out_dir)
    return manifest


def shard_urls(out_dir: str) -> list[str]:
    base = out_dir.rstrip("/")
    return [f"{base}/{s}" for s in read_wds_manifest(out_dir)["webdataset"]["shards"]]


def _check_member(name: str, shard: str) -> None:
    # nothing is extracted to disk, but a member that tries to leave its folder is a forged shard
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        raise StoreError(f"{shard}: tar member {name!r} is not a plain file name; refusing the shard")


def decode_sample(sample: dict, shard: str = "?") -> ClipArrays:
    """A raw WebDataset sample (bytes per extension) -> ClipArrays. No pickle is ever loaded."""
    def arr(ext):
        return np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    for key in sample:
        if not key.startswith("__"):
            _check_member(f"{sample['__key__']}.{key}", shard)
    meta = json.loads(sample["json"])
    return ClipArrays(sample["__key__"], arr("features.npy"), arr("latents.npy"), meta,
                      arr("pred_features.npy") if "pred_features.npy" in sample else None)


def iter_shard(url: str) -> Iterator[ClipArrays]:
    """Stream one tar shard (local path or URL) without extracting it."""
    import fsspec
    opener = fsspec.open(url, "rb") if is_url(url) else open(url, "rb")
    with opener as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                raise StoreError(f"{url}: tar member {member.name!r} is not a regular file")
            _check_member(member.name, url)
            key, ext = member.name.split(".", 1)
            if sample and sample["__key__"] != key:
                yield decode_sample(sample, url)
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield decode_sample(sample, url)


def iter_webdataset(urls: Iterable[str]) -> Iterator[ClipArrays]:
    for url in urls:
        yield from iter_shard(url)
