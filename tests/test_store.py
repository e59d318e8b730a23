"""Store format v1: round trips, channel prefixes, URLs, refusals, unfinished stores, WebDataset."""

import json
import tarfile

import numpy as np
import pytest
import zarr

from pipeline.store.format import (
    FORMAT_VERSION,
    IncompatibleStoresError,
    IncompleteStoreError,
    NotAStoreError,
    StoreError,
    StoreVersionError,
)
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store, open_stores
from pipeline.store.wds import export_webdataset, iter_webdataset, shard_urls
from tests.store_factory import ENCODERS, make_store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "store.zarr"
    _, index, written = make_store(path, channel_chunk=16)
    return path, index, written


def test_round_trip_is_exact_for_float16(store_path):
    path, index, written = store_path
    store = Store(str(path))
    assert len(store) == len(index.clips) == 4  # 2 scenes x 29 frames, stride 4 -> windows at 0, 4
    for i, clip in enumerate(index.clips):
        arrays = store.read_clip(i)
        assert arrays.clip_id == clip.clip_id
        assert arrays.features.shape == TINY.features_shape and arrays.features.dtype == np.float16
        assert arrays.latents.shape == TINY.latents_shape
        np.testing.assert_array_equal(arrays.latents, written[("latents", i)])
        expected = np.stack([written[("features", r)] for r in clip.feature_rows])
        np.testing.assert_array_equal(arrays.features, expected)
        assert arrays.meta["timestamps"] == pytest.approx(clip.timestamps)


@pytest.mark.parametrize("compression", ["none", "blosc-zstd:1"])
def test_channel_prefix_reads_return_the_prefix_and_touch_fewer_bytes(tmp_path, compression, monkeypatch):
    path = tmp_path / "s.zarr"
    _, index, written = make_store(path, channel_chunk=16, compression=compression)
    store = Store(str(path))
    full = store.read_features(1)
    np.testing.assert_array_equal(full, np.stack([written[("features", r)] for r in index.clips[1].feature_rows]))
    np.testing.assert_array_equal(store.read_features(1, channels=16), full[..., :16])
    np.testing.assert_array_equal(store.read_features(1, channels=20), full[..., :20])  # inside a chunk
    with pytest.raises(StoreError, match="channels must be in 1..64"):
        store.read_features(1, channels=store.num_channels + 1)
    # count the chunk bytes read for a prefix against a full read: through Zarr's store, or the file
    # reads of the direct path for uncompressed chunks (which then never asks Zarr for a chunk)
    import os

    import zarr.storage

    got, zarr_got = [], []
    get, preadv = zarr.storage.LocalStore.get, os.preadv

    async def counting_get(self, key, prototype, byte_range=None):
        buf = await get(self, key, prototype, byte_range)
        if buf is not None and key.startswith("frames/features/c"):
            zarr_got.append(len(buf.to_bytes()))
        return buf

    def counting_preadv(fd, buffers, offset):
        got.append(preadv(fd, buffers, offset))
        return got[-1]

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    fresh = Store(str(path))
    fresh.read_features(1, channels=16)
    prefix_bytes, got[:], zarr_got[:] = sum(got + zarr_got), [], []
    fresh.read_features(1)
    full_bytes = sum(got + zarr_got)
    assert prefix_bytes < 0.4 * full_bytes, (prefix_bytes, full_bytes)  # 16/64 channels = 1 of 4 chunks
    assert (sum(zarr_got) == 0) == (compression == "none")  # uncompressed rows bypass Zarr's codecs


def test_overlapping_clips_share_frames(store_path):
    path, index, _ = store_path
    store = Store(str(path))
    # windows at 0 and 4 of one scene share 6 of their 7 feature frames: 8 frames stored, not 14
    assert store.group["frames/features"].shape[0] == len(index.frames) == 2 * 8
    rows = store.group["clips/feature_rows"][...]
    assert list(rows[1][:6]) == list(rows[0][1:])


def test_tools_read_the_arrays_as_stored_through_public_accessors(store_path):
    """feature_rows, features_array and latents_array (benchmarks/bench_loader.py's raw reads) hold what
    read_features and read_latents return."""
    path, index, _ = store_path
    store = Store(str(path))
    for i, clip in enumerate(index.clips):
        rows = store.feature_rows(i)
        assert list(rows) == list(clip.feature_rows)
        np.testing.assert_array_equal(np.stack([store.features_array[int(r)] for r in rows]), store.read_features(i))
        np.testing.assert_array_equal(store.latents_array[store.row(i)], store.read_latents(i))


def test_open_by_file_url(store_path):
    path, _index, written = store_path
    store = Store(f"file://{path}")
    np.testing.assert_array_equal(store.read_latents(2), written[("latents", 2)])


def test_not_a_store_and_missing_paths_are_clear_errors(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(NotAStoreError, match="plain.zarr is not a re2pix store"):
        Store(str(tmp_path / "plain.zarr"))
    with pytest.raises(NotAStoreError, match="nowhere.zarr"):
        Store(str(tmp_path / "nowhere.zarr"))


def test_newer_format_version_is_refused(tmp_path):
    make_store(tmp_path / "s.zarr", scenes=1, frames=25)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreVersionError, match=f"version {FORMAT_VERSION + 1}, newer"):
        Store(str(tmp_path / "s.zarr"))


def test_unfinished_store_is_not_readable_as_finished(tmp_path):
    w, _index, _ = make_store(tmp_path / "s.zarr", scenes=1, frames=25, finalize=False)
    with pytest.raises(IncompleteStoreError, match="never finished"):
        Store(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="not done"):
        w.finalize(["unit-000000", "unit-000001"])
    assert Store(str(tmp_path / "s.zarr"), allow_incomplete=True).manifest["complete"] is False
    w.finalize(["unit-000000"])
    assert len(Store(str(tmp_path / "s.zarr"))) == 1


def test_failed_clips_are_listed_with_file_and_reason_and_not_served(tmp_path):
    make_store(tmp_path / "s.zarr", fail_clips=[1])
    store = Store(str(tmp_path / "s.zarr"))
    assert len(store) == 3 and "scene-00-000004" not in store.clip_ids
    assert store.failures() == [{"clip_id": "scene-00-000004", "file": "scene-00/bad.png", "reason": "truncated PNG"}]
    assert store.manifest["counts"]["failed_clips"] == 1


def test_compatibility_refuses_mixed_stores_naming_the_field(tmp_path):
    make_store(tmp_path / "a.zarr", scenes=1, frames=25)
    make_store(tmp_path / "b.zarr", scenes=1, frames=25, seed=1)  # same basis, other data: compatible
    make_store(tmp_path / "c.zarr", scenes=1, frames=25, basis_seed=7)
    other_vae = {**ENCODERS, "vae": {**ENCODERS["vae"], "sha256": "c" * 64}}
    make_store(tmp_path / "d.zarr", scenes=1, frames=25, encoders=other_vae)
    assert len(open_stores([str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")])) == 2
    with pytest.raises(IncompatibleStoresError, match="pca.fingerprint differs") as e:
        open_stores([str(tmp_path / "a.zarr"), str(tmp_path / "c.zarr")])
    assert e.value.field == "pca.fingerprint"
    with pytest.raises(IncompatibleStoresError, match="encoders.vae.sha256 differs"):
        open_stores([str(tmp_path / "a.zarr"), str(tmp_path / "d.zarr")])
    # a different weights_id with the same weights hash (hub id vs local folder) is compatible
    same_weights = {**ENCODERS, "vae": {**ENCODERS["vae"], "weights_id": "/models/wan-vae"}}
    make_store(tmp_path / "e.zarr", scenes=1, frames=25, encoders=same_weights)
    open_stores([str(tmp_path / "a.zarr"), str(tmp_path / "e.zarr")])


def test_rerun_of_an_unfinished_store_with_other_settings_is_refused(tmp_path):
    make_store(tmp_path / "s.zarr", scenes=1, frames=25, finalize=False)
    with pytest.raises(StoreError, match="pca.fingerprint"):
        make_store(tmp_path / "s.zarr", scenes=1, frames=25, basis_seed=3)
    make_store(tmp_path / "t.zarr", scenes=1, frames=25)
    with pytest.raises(StoreError, match="already a finished store"):
        make_store(tmp_path / "t.zarr", scenes=1, frames=25)


def test_flip_variants_are_rows_of_the_same_clip(tmp_path):
    _, _index, written = make_store(tmp_path / "s.zarr", scenes=1, frames=25, variants=("orig", "hflip"))
    store = Store(str(tmp_path / "s.zarr"))
    assert len(store) == 1 and store.variants == ["orig", "hflip"]
    np.testing.assert_array_equal(store.read_latents(0, variant=1), written[("latents", 1)])
    assert store.clip_meta(0, variant=1)["clip_id"].endswith("-hflip")
    f1 = store.read_features(0, variant=1)
    np.testing.assert_array_equal(f1[0], written[("features", 1)])  # frame 0's hflip row


def test_verify_detects_a_changed_row(tmp_path):
    make_store(tmp_path / "s.zarr", scenes=1, frames=25)
    report = Store(str(tmp_path / "s.zarr")).verify()
    assert report["ok"] and report["bad_rows"] == [] and report["checked"] == {"frames/features": 7, "clips/latents": 1}
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g["clips/latents"][0, 0, 0, 0, 0] = 123.0
    report = Store(str(tmp_path / "s.zarr")).verify()
    assert not report["ok"] and report["bad_rows"] == [
        {"array": "clips/latents", "row": 0, "reason": "differs from the digest recorded when it was written"}
    ]


def test_webdataset_export_reads_back_equal_to_zarr(tmp_path, store_path):
    path, _index, _ = store_path
    store = Store(str(path))
    shards = export_webdataset(store, str(tmp_path / "wds"), shard_size_mb=0.05, progress=False)
    assert len(shards) > 1 and shard_urls(str(tmp_path / "wds")) == shards
    streamed = list(iter_webdataset(shards))
    assert [c.clip_id for c in streamed] == store.clip_ids
    for i, clip in enumerate(streamed):
        ref = store.read_clip(i)
        np.testing.assert_array_equal(clip.features, ref.features)
        np.testing.assert_array_equal(clip.latents, ref.latents)
        assert clip.meta == ref.meta
    prefix = export_webdataset(store, str(tmp_path / "wds16"), channels=16, progress=False)
    first = next(iter_webdataset(prefix))
    np.testing.assert_array_equal(first.features, store.read_features(0, channels=16))


def test_webdataset_refuses_members_that_escape_their_folder(tmp_path):
    import io

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        data = json.dumps({}).encode()
        info = tarfile.TarInfo("../evil.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(StoreError, match="not a plain file name"):
        list(iter_webdataset([str(bad)]))


def test_features_read_right_when_clip_rows_are_not_evenly_spaced(tmp_path):
    # stride 1: later clips reuse rows of earlier ones out of order, so rows are not one strided slice
    _, index, written = make_store(tmp_path / "s.zarr", scenes=1, frames=30, stride=1)
    rows = [c.feature_rows for c in index.clips]
    assert any(len(set(np.diff(r))) > 1 for r in rows) and any(len(set(np.diff(r))) == 1 for r in rows)
    store = Store(str(tmp_path / "s.zarr"))
    for i, clip in enumerate(index.clips):
        expected = np.stack([written[("features", r)][..., :8] for r in clip.feature_rows])
        np.testing.assert_array_equal(store.read_features(i, channels=8), expected)
