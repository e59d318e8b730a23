"""WebDataset exports to an fsspec URL (a real S3-protocol server on 127.0.0.1), self-contained, and trained from."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from pipeline.store.reader import Store
from pipeline.store.wds import export_webdataset, iter_webdataset, read_wds_basis, read_wds_manifest, shard_urls
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3-protocol server (tests/conftest.py) with this module's bucket."""
    s3_server.create_bucket("shards")
    return {"options": s3_server.storage_options, "endpoint": s3_server.endpoint}


@pytest.mark.slow  # a real S3 server round trip
def test_export_to_s3_writes_there_and_reads_back_whole(tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()  # a local folder named like the bucket must not receive the shards
    make_store(tmp_path / "s.zarr", scenes=2, frames=33)
    store = Store("s.zarr")
    url = "s3://shards/export"
    urls = export_webdataset(store, url, channels=16, shard_size_mb=0.05, progress=False, storage_options=s3["options"])
    assert len(urls) > 1 and not any((tmp_path / "shards").iterdir())
    fs = fsspec.filesystem("s3", **s3["options"])
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("shards/export"))
    assert {"manifest.json", "pca.npz", "README.md"} <= set(names) and ".re2pix-export.json" not in names
    manifest = read_wds_manifest(url, s3["options"])
    assert manifest["webdataset"]["source_store"] == f"file://{tmp_path}/s.zarr"
    shards = sorted("data/" + p.rsplit("/", 1)[-1] for p in fs.ls("shards/export/data"))
    assert manifest["webdataset"]["shards"] == [u.removeprefix(url + "/") for u in urls] == shards
    basis = read_wds_basis(url, s3["options"])
    np.testing.assert_array_equal(basis.components, store.basis.components)
    assert "shard-NNNNNN.tar" in fs.cat_file("shards/export/README.md").decode()
    clips = list(iter_webdataset(shard_urls(url, s3["options"]), s3["options"]))
    assert [c.clip_id for c in clips] == store.clip_ids
    for i, c in enumerate(clips):
        np.testing.assert_array_equal(c.features, store.read_features(i, 16))
        np.testing.assert_array_equal(c.latents, store.read_latents(i))
    assert json.loads(fs.cat_file("shards/export/manifest.json"))["webdataset"]["samples"] == len(store)


def test_training_streams_from_shards_on_s3(tmp_path, s3, monkeypatch):
    """The trainer's ClipStream reads an export on S3 (credentials and endpoint from the environment)."""
    from model.data import open_stream

    make_store(tmp_path / "s.zarr", scenes=1, frames=29)
    store = Store(str(tmp_path / "s.zarr"))
    export_webdataset(store, "s3://shards/train", progress=False, storage_options=s3["options"])
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3["endpoint"],
    }.items():
        monkeypatch.setenv(k, v)
    stream = open_stream(
        ["s3://shards/train"], batch_size=2, loop=False, remainder="keep", shuffle=False, rank=0, world=1
    )
    batches = [b for b in stream]
    feats = np.concatenate([np.asarray(b["features"]) for b in batches])
    assert feats.shape[0] == len(store)
    np.testing.assert_array_equal(feats[0], store.read_features(0).astype(feats.dtype))
