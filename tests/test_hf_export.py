"""A WebDataset export loads as it is in Hugging Face `datasets` (its card's YAML header), in plain webdataset,
and in our trainer's stream, new layout (shards under data/) and old (shards beside the manifest) alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.data import open_stream
from pipeline.store.reader import Store
from pipeline.store.wds import export_webdataset, iter_webdataset, shard_urls
from tests.store_factory import make_store

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    make_store(tmp / "s.zarr", variants=("orig", "hflip"))
    store = Store(str(tmp / "s.zarr"))
    export_webdataset(store, str(tmp / "wds"), channels=16, shard_size_mb=0.3, progress=False)
    return store, tmp / "wds"


def _expected(store: Store) -> dict[str, object]:
    return {
        c.clip_id: c for i in range(len(store)) for v in range(2) for c in [store.read_clip(i, channels=16, variant=v)]
    }


def _assert_rows_equal(ds, store: Store) -> None:
    want = _expected(store)
    assert len(ds) == len(want)
    arrays = ["latents.npy", "features.npy"]
    rows = ds.with_format("numpy", columns=arrays, dtype=np.float16, output_all_columns=True)
    for row in rows:
        clip = want[row["__key__"]]
        for name, ours in (("latents.npy", clip.latents), ("features.npy", clip.features)):
            assert row[name].dtype == np.float16 and row[name].shape == ours.shape
            np.testing.assert_array_equal(row[name], ours)
        assert row["json"] == clip.meta


def test_load_dataset_reads_the_export_folder_as_it_is(export, tmp_path):
    store, out = export
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["latents.npy"] == datasets.Array4D((16, 7, 12, 20), "float16")
    assert ds.features["features.npy"] == datasets.Array4D((7, 8, 14, 16), "float16")
    _assert_rows_equal(ds, store)


def test_load_dataset_webdataset_reads_the_shard_folder(export, tmp_path):
    store, out = export
    ds = datasets.load_dataset("webdataset", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "c"))
    _assert_rows_equal(ds, store)


def test_the_card_shows_the_bucket_recipe_and_plain_webdataset_reads_the_shards(export):
    import webdataset as wds

    _, out = export
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nconfigs:") and "pipe:aws s3 cp s3://" in readme
    shards = sorted(str(p) for p in (out / "data").iterdir())
    assert len(shards) > 1 and shards == shard_urls(str(out))
    first = next(iter(wds.WebDataset(shards, shardshuffle=False).decode()))
    assert first["latents.npy"].dtype == np.float16 and first["features.npy"].shape == (7, 8, 14, 16)


def test_the_trainer_streams_the_new_layout_and_old_exports(export, tmp_path):
    store, out = export
    new = [c.clip_id for c in iter_webdataset(shard_urls(str(out)))]
    # an export made before: shards beside the manifest, listed by their bare names
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    for name in manifest["webdataset"]["shards"]:
        (old / name.split("/")[-1]).write_bytes((out / name).read_bytes())
    manifest["webdataset"]["shards"] = [n.split("/")[-1] for n in manifest["webdataset"]["shards"]]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert [c.clip_id for c in iter_webdataset(shard_urls(str(old)))] == new == list(_expected(store))
    for source in (out, old, out / "data" / "shard-{000000..000001}.tar"):
        stream = open_stream(str(source), batch_size=2, channels=16, loop=False, remainder="keep")
        assert sorted(cid for b in stream for cid in b["clip_id"]) == sorted(new), source


def test_a_stream_fills_its_buffer_from_what_the_sources_hold_and_reads_the_manifest_once(export, monkeypatch):
    import pipeline.store.wds as wds

    _, out = export
    stream = open_stream(str(out), batch_size=2, channels=16, shuffle_buffer=256)  # 8 samples in 2 shards
    opened, manifests = [], []
    real_shard, real_manifest = wds.iter_shard, wds.read_wds_manifest
    monkeypatch.setattr(wds, "iter_shard", lambda url, *a: opened.append(url) or real_shard(url, *a))
    monkeypatch.setattr(wds, "read_wds_manifest", lambda *a: manifests.append(a) or real_manifest(*a))
    first = next(iter(stream))
    # the buffer holds 8 samples (not 256): filling it and one batch open at most 4 shards of 4 samples
    assert len(first["clip_id"]) == 2 and len(opened) <= 4
    assert manifests == []  # the shapes each sample is checked against were read when the stream opened
