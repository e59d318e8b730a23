"""A local chunk cache for stores read by URL: the second epoch reads from disk, not from the server.

Set `RE2PIX_CHUNK_CACHE=/local/folder` (and optionally `RE2PIX_CHUNK_CACHE_GB`, default 100) and every
`reader.Store` opened on a URL (s3://, gs://, https://, hf://, ...) keeps each chunk it fetches in that
folder: training, rollouts and their DataLoader workers, and every rank on one machine, share it.

- What is cached: the bytes of each (object, byte range) zarr asks for under an array's `c/` chunk keys;
  never metadata (zarr.json: a rollout adds arrays, finalize changes attributes) nor clips/pred_features
  (a rollout with --overwrite rewrites them). A finished store's chunks never change otherwise.
- Safe between processes: an entry is written to a unique temporary file and renamed into place
  (readers see a whole entry or none); eviction holds an flock on the folder's `.lock`; an entry evicted
  while another process reads it is a miss there, never an error. Bytes served from the cache are still
  checked by the store's codecs (crc32c), so a damaged cache file is damage, never silent data.
- Size limit: when the bytes this process added since its last check exceed 5 % of the limit, the oldest
  entries (by last use) are removed until the folder holds at most 90 % of the limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from pipeline.store.location import fsspec_store

ENV_FOLDER, ENV_LIMIT_GB = "RE2PIX_CHUNK_CACHE", "RE2PIX_CHUNK_CACHE_GB"
# per process: bytes the server returned (every read, metadata included) and bytes served from the cache
STATS = {"fetched_bytes": 0, "cache_bytes": 0}


class ChunkCache:
    """A folder of entries named by a hash of (store URL, key, byte range), least recently used evicted first."""

    def __init__(self, folder: str, limit_bytes: int):
        self.folder, self.limit = os.path.abspath(folder), int(limit_bytes)
        os.makedirs(self.folder, exist_ok=True)
        self._added = 0

    def path(self, location: str, key: str, byte_range) -> str:
        h = hashlib.sha256(f"{location}\0{key}\0{_range_key(byte_range)}".encode()).hexdigest()
        return os.path.join(self.folder, h[:2], h)

    def get(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # its last use: eviction removes the oldest first
            return data
        except FileNotFoundError:  # never cached, or evicted by another process meanwhile
            return None

    def put(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: another worker sees the whole entry or none
        self._added += len(data)
        if self._added > self.limit // 20:
            self.evict()

    def evict(self) -> None:
        self._added = 0
        with open(os.path.join(self.folder, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            for sub in os.scandir(self.folder):
                if sub.is_dir():
                    for e in os.scandir(sub.path):
                        if ".tmp-" not in e.name:
                            try:
                                st = e.stat()
                            except FileNotFoundError:
                                continue
                            entries.append((st.st_mtime, st.st_size, e.path))
            total = sum(s for _, s, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.limit * 0.9:
                    break
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                total -= size

    def size(self) -> int:
        return sum(e.stat().st_size for sub in os.scandir(self.folder) if sub.is_dir() for e in os.scandir(sub.path))


def _range_key(r) -> str:
    if r is None:
        return "all"
    if isinstance(r, RangeByteRequest):
        return f"{r.start}-{r.end}"
    if isinstance(r, OffsetByteRequest):
        return f"{r.offset}-"
    if isinstance(r, SuffixByteRequest):
        return f"-{r.suffix}"
    raise TypeError(f"unknown byte range {r!r}")


def _cacheable(key: str) -> bool:
    return ("/c/" in key or key.startswith("c/")) and not key.startswith("clips/pred_features/")


class CachingStore(WrapperStore):
    """A read-only zarr store that keeps the chunks it reads through `store` in a ChunkCache."""

    def __init__(self, store, cache: ChunkCache, location: str):
        super().__init__(store)
        self.cache, self.location = cache, location

    async def get(self, key, prototype, byte_range=None):
        if not _cacheable(key):
            buf = await self._store.get(key, prototype, byte_range)
            STATS["fetched_bytes"] += len(buf) if buf is not None else 0
            return buf
        path = self.cache.path(self.location, key, byte_range)
        data = self.cache.get(path)
        if data is not None:
            STATS["cache_bytes"] += len(data)
            return prototype.buffer.from_bytes(data)
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            raw = buf.to_bytes()
            STATS["fetched_bytes"] += len(raw)
            self.cache.put(path, raw)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, r) for key, r in key_ranges]


def cached_store(location: str, storage_options: dict | None = None):
    """A CachingStore for `location` when RE2PIX_CHUNK_CACHE names a folder and `location` is a URL; else None."""
    folder = os.environ.get(ENV_FOLDER)
    if not folder or "://" not in str(location) or str(location).startswith("file://"):
        return None
    limit = float(os.environ.get(ENV_LIMIT_GB, "100")) * 2**30
    inner = fsspec_store(str(location), storage_options, read_only=True)
    return CachingStore(inner, ChunkCache(folder, int(limit)), str(location))
