"""Another Zarr v3 implementation reads every array of a store equal to our reader: tensorstore's zarr3 driver."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store.card import _arrays
from pipeline.store.copy import copy_store
from pipeline.store.format import decode_strings
from pipeline.store.reader import Store
from tests.store_factory import make_store

ts = pytest.importorskip("tensorstore")


def _open(path, name, kvstore=None):
    kvstore = {"driver": "file", "path": f"{path}/{name}/"} if kvstore is None else kvstore
    return ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True).result()


@pytest.mark.parametrize("compression", ["blosc-zstd", "zstd", "none", "blosc-zstd+int8"])
def test_tensorstore_reads_every_array_equal_to_zarr(tmp_path, compression):
    path = tmp_path / "s.zarr"
    make_store(path, scenes=2, frames=29, channel_chunk=16, fail_clips=(1,), compression=compression)
    store = Store(str(path))
    names = [name for name, _ in _arrays(store.group)]
    assert {"clips/id", "frames/path", "failures/reason", "pca/components", "frames/features"} <= set(names)
    for name, arr in _arrays(store.group):
        ours = arr[...]
        theirs = _open(path, name).read().result()
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, name
        np.testing.assert_array_equal(theirs, ours, err_msg=name)
        # every array is under the codec --compression names, then a crc32c checksum
        codecs = [c["name"] for c in arr.metadata.to_dict()["codecs"]]
        inner = arr.metadata.to_dict()["codecs"][0].get("configuration", {}).get("codecs", [])
        chain = [c["name"] for c in inner] if codecs[0] == "sharding_indexed" else codecs
        want = {"blosc-zstd": "blosc", "zstd": "zstd", "none": None}[compression.split("+")[0]]
        assert chain[-1] == "crc32c" and (want in chain if want else chain == ["bytes", "crc32c"]), (name, chain)
    # strings: both read the same UTF-8 bytes, and they decode to what our reader serves
    ids = decode_strings(_open(path, "clips/id").read().result())
    assert [ids[r] for r in store._clip_rows] == store.clip_ids
    reasons = decode_strings(_open(path, "failures/reason").read().result())
    assert list(reasons) == [f["reason"] for f in store.failures()] == ["truncated PNG"]
    # a channel prefix, and the int8 option un-applied by hand from the stored scales
    row = int(store._feature_rows[store.row(0)][0])
    prefix = _open(path, "frames/features")[row, :, :, :16].read().result()
    if compression.endswith("int8"):
        scales = _open(path, "frames/feature_scales")[row, :16].read().result()
        prefix = (prefix.astype(np.float32) * scales).astype(np.float16)
    np.testing.assert_array_equal(prefix, store.read_features(0, 16)[0])


def test_tensorstore_checks_the_chunk_checksums(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, scenes=1, frames=25)
    chunk = path / "clips" / "latents" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(data)
    with pytest.raises(ValueError, match="Digest mismatch"):
        _open(path, "clips/latents")[0].read().result()


def test_an_old_store_with_vlen_strings_still_reads(tmp_path):
    """Stores written before the uint8 text encoding used zarr's `string` dtype; our reader reads both."""
    import zarr

    path = tmp_path / "s.zarr"
    make_store(path, scenes=1, frames=25)
    g = zarr.open_group(str(path), mode="r+")
    ids = Store(str(path)).clip_ids
    a = g["clips"].create_array("id", shape=(len(ids),), dtype=str, overwrite=True)
    a[...] = np.array(ids, dtype=object)
    assert Store(str(path)).clip_ids == ids


@pytest.mark.slow  # a real S3 server round trip
def test_tensorstore_reads_a_store_over_s3_equal_to_ours(tmp_path, s3_server, monkeypatch):
    """tensorstore's s3 kvstore at a custom endpoint (the moto server on 127.0.0.1), credentials and region
    from the standard AWS variables, as a user of another team would set them."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "s.zarr"
    make_store(local, scenes=2, frames=29, channel_chunk=16, fail_clips=(1,))
    bucket = s3_server.bucket()
    copy_store(str(local), f"s3://{bucket}/s.zarr", dst_options=s3_server.storage_options, progress=False)
    store = Store(f"s3://{bucket}/s.zarr", s3_server.storage_options)

    def over_s3(name):
        kv = {"driver": "s3", "bucket": bucket, "path": f"s.zarr/{name}/", "endpoint": s3_server.endpoint}
        return _open(None, name, dict(kv, aws_region="us-east-1"))

    names = [name for name, _ in _arrays(store.group)]
    assert {"clips/id", "pca/components", "frames/features", "clips/latents"} <= set(names)
    for name, arr in _arrays(store.group):
        np.testing.assert_array_equal(over_s3(name).read().result(), arr[...], err_msg=name)
    row = int(store._feature_rows[store.row(0)][0])  # a channel prefix
    np.testing.assert_array_equal(
        over_s3("frames/features")[row, :, :, :16].read().result(), store.read_features(0, 16)[0]
    )
