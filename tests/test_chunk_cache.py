"""Reading a remote store once: a local chunk cache (RE2PIX_CHUNK_CACHE) against a real S3-protocol server."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store import chunk_cache
from pipeline.store.copy import copy_store
from pipeline.store.reader import Store
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3-protocol server (tests/conftest.py) with this module's bucket."""
    s3_server.create_bucket("cache")
    return {"options": s3_server.storage_options}


def _epoch(url, options, channels):
    """One epoch as a training run reads it: a fresh reader (a new worker), every clip's features and latents."""
    before = dict(chunk_cache.STATS)
    store = Store(url, options)
    out = [(store.read_features(i, channels), store.read_latents(i)) for i in range(len(store))]
    return {k: chunk_cache.STATS[k] - before[k] for k in before}, out


@pytest.mark.slow  # a real S3 server round trip
def test_a_second_epoch_fetches_under_5_percent_of_the_first(tmp_path, s3, monkeypatch):
    make_store(tmp_path / "s.zarr", scenes=3, frames=45, channel_chunk=16)
    url = "s3://cache/s.zarr"
    copy_store(str(tmp_path / "s.zarr"), url, dst_options=s3["options"], progress=False)
    monkeypatch.setenv(chunk_cache.ENV_FOLDER, str(tmp_path / "chunks"))
    first, a = _epoch(url, s3["options"], 32)
    second, b = _epoch(url, s3["options"], 32)
    print(f"fetched from the server: epoch 1 {first['fetched_bytes']} B, epoch 2 {second['fetched_bytes']} B")
    assert first["fetched_bytes"] > 0  # (epoch 1 already reads frames shared by clips from the cache)
    assert second["fetched_bytes"] <= 0.05 * first["fetched_bytes"]
    assert second["cache_bytes"] > first["fetched_bytes"] / 2
    local = Store(str(tmp_path / "s.zarr"))
    for i, (f, z) in enumerate(b):  # the cache serves exactly what the server holds
        np.testing.assert_array_equal(f, local.read_features(i, 32))
        np.testing.assert_array_equal(z, local.read_latents(i))
        np.testing.assert_array_equal(f, a[i][0])


@pytest.mark.slow  # a real S3 server round trip
def test_the_cache_stays_under_its_limit_and_a_damaged_entry_is_damage(tmp_path, s3, monkeypatch):
    from pipeline.store.format import DamagedStoreError

    make_store(tmp_path / "s.zarr", scenes=2, frames=33)
    url = "s3://cache/small.zarr"
    copy_store(str(tmp_path / "s.zarr"), url, dst_options=s3["options"], progress=False)
    monkeypatch.setenv(chunk_cache.ENV_FOLDER, str(tmp_path / "small"))
    monkeypatch.setenv(chunk_cache.ENV_LIMIT_GB, str(200e3 / 2**30))  # 200 kB
    _epoch(url, s3["options"], None)
    cache = chunk_cache.ChunkCache(str(tmp_path / "small"), 200_000)
    assert 0 < cache.size() <= 200_000
    # corrupt every cached entry: the store's crc32c refuses what the cache hands out
    monkeypatch.setenv(chunk_cache.ENV_LIMIT_GB, "1")
    _epoch(url, s3["options"], None)
    for sub in (tmp_path / "small").iterdir():
        for e in sub.iterdir() if sub.is_dir() else ():
            data = bytearray(e.read_bytes())
            data[len(data) // 2] ^= 0xFF
            e.write_bytes(data)
    with pytest.raises(DamagedStoreError):
        _epoch(url, s3["options"], None)


@pytest.mark.slow  # a real S3 server round trip
def test_dataloader_workers_share_the_cache_and_a_second_epoch_adds_nothing(tmp_path, s3, monkeypatch):
    from model.data import make_loader, open_stream

    make_store(tmp_path / "s.zarr", scenes=2, frames=41)
    url = "s3://cache/workers.zarr"
    copy_store(str(tmp_path / "s.zarr"), url, dst_options=s3["options"], progress=False)
    monkeypatch.setenv(chunk_cache.ENV_FOLDER, str(tmp_path / "shared"))

    def epoch():
        stream = open_stream(
            [url],
            batch_size=2,
            loop=False,
            remainder="keep",
            shuffle=False,
            rank=0,
            world=1,
            storage_options=s3["options"],
            channels=16,
        )
        batches = sorted((b["clip_id"], np.asarray(b["features"])) for b in make_loader(stream, workers=2))
        entries = sorted(p.name for p in (tmp_path / "shared").rglob("*") if p.is_file() and p.name != ".lock")
        return batches, entries

    first, cached = epoch()
    second, cached_again = epoch()
    assert cached and cached_again == cached  # epoch 2 (new worker processes) found every chunk in the cache
    assert not any(".tmp-" in name for name in cached)
    for (ida, fa), (idb, fb) in zip(first, second):
        assert ida == idb
        np.testing.assert_array_equal(fa, fb)
