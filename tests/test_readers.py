"""Readers nobody here wrote open our stores: xarray (locally and over S3), zarr's consolidated open,
pandas on clips.parquet; `jobs.store upgrade` gives stores written before the same, touching no chunk."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

from jobs.store import main as store_main
from pipeline.store.copy import copy_store
from pipeline.store.describe import CONVENTION
from pipeline.store.format import decode_strings
from pipeline.store.reader import Store
from tests.store_factory import make_store

xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


def _datatree_equals_our_reader(dt, store: Store, clips: int | None = None) -> None:
    assert {"/frames", "/clips", "/pca", "/failures"} <= set(dt.groups)
    latents = dt["clips"]["latents"]
    assert latents.dims == ("clip_row", "latent_channel", "latent_frame", "latent_y", "latent_x")
    assert not latents.variable._in_memory  # lazy: nothing read before it is asked for
    features = dt["frames"]["features"]
    assert features.dims == ("frame_row", "y", "x", "pca_channel")
    for i in range(clips or len(store)):
        row = store.row(i)
        np.testing.assert_array_equal(latents[row].values, store.read_latents(i))
        np.testing.assert_array_equal(features[store._feature_rows[row]].values, store.read_features(i))
    assert list(decode_strings(dt["clips"]["id"].values)) == list(store.clip_table["id"])
    assert dt["clips"]["timestamps"].attrs[CONVENTION]["units"] == "seconds"
    assert "(z[c] - mean[c]) / std[c]" in latents.attrs[CONVENTION]["latent_norm"]["applied"]
    assert dt["clips"]["id"].dims == ("clip_row", "id_byte") and dt["clips"]["scene"].dims == ("clip_row", "scene_byte")


def test_xarray_opens_every_group_of_a_local_store_lazily(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, variants=("orig", "hflip"), fail_clips=(1,))
    store = Store(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated: no tree walk, so no warning about README.md & co
        dt = xr.open_datatree(str(path), engine="zarr")
        consolidated = zarr.open_consolidated(str(path), zarr_format=3)
    _datatree_equals_our_reader(dt, store)
    assert dict(consolidated["clips/latents"].attrs)[CONVENTION]["version"]


@pytest.mark.slow  # tens of small S3 requests against moto
def test_upgrade_over_s3_then_xarray_opens_the_store_there(tmp_path, s3_server, capsys):
    path = tmp_path / "s.zarr"
    make_store(path)
    _strip_to_an_old_store(path)
    url = f"s3://{s3_server.bucket()}/s.zarr"
    options = s3_server.storage_options
    s3_server.filesystem().put(str(path), url, recursive=True)
    assert store_main(["upgrade", url, "--storage-options", json.dumps(options)]) == 0
    assert options["secret"] not in capsys.readouterr().out
    dt = xr.open_datatree(url, engine="zarr", storage_options=options)
    store = Store(url, options)
    _datatree_equals_our_reader(dt, store, clips=1)
    with s3_server.filesystem().open(f"{url}/clips.parquet", "rb") as f:
        assert list(pd.read_parquet(f)["id"]) == list(store.clip_table["id"])


def test_clip_table_reads_with_pandas_equal_to_our_index(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, variants=("orig", "hflip"), fail_clips=(0,))
    store = Store(str(path))
    table = pd.read_parquet(path / "clips.parquet")
    t = store.clip_table
    assert list(table["id"]) == list(t["id"]) and list(table["scene"]) == list(t["scene"])
    assert list(table["start"]) == t["start"].tolist()
    np.testing.assert_array_equal(np.stack(table["timestamps"]), t["timestamps"])
    np.testing.assert_array_equal(np.stack(table["feature_rows"]), store._feature_rows)
    usable = table[table["valid"]]
    assert list(usable["row"]) == [store.row(i, v) for i in range(len(store)) for v in range(2)]
    assert list(usable["variant"][::2]) == ["orig"] * len(store)
    paths = decode_strings(store.group["frames/path"][...])
    assert list(table["source_path"]) == [paths[r[0]] for r in store._feature_rows]
    assert store.verify()["ok"]

    # a table that no longer agrees with the arrays is a problem verify names
    table.loc[3, "scene"] = "elsewhere"
    table.to_parquet(path / "clips.parquet")
    bad = [b for b in Store(str(path)).verify()["bad_rows"] if b["array"] == "clips.parquet"]
    assert bad and bad[0]["row"] == 3 and "scene" in bad[0]["reason"]


def _strip_to_an_old_store(path) -> None:
    """What a store written before dimension names, clips.parquet and consolidated metadata looks like."""
    for meta_path in path.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        meta.pop("dimension_names", None)
        meta.pop("consolidated_metadata", None)
        meta.get("attributes", {}).pop(CONVENTION, None)
        meta_path.write_text(json.dumps(meta))
    (path / "clips.parquet").unlink()


def test_upgrade_names_an_old_stores_dimensions_without_rewriting_a_chunk(tmp_path, capsys):
    path = tmp_path / "old.zarr"
    make_store(path)
    _strip_to_an_old_store(path)
    store = Store(str(path))  # old stores keep reading
    before = store.read_clip(0)
    with pytest.raises(KeyError, match="dimension_names"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree walk's, one per non-Zarr entry (describe.py)
        xr.open_datatree(str(path), engine="zarr", consolidated=False)
    chunks = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file() and "/c/" in str(p)}
    assert chunks

    assert store_main(["upgrade", str(path)]) == 0
    assert "clips.parquet" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunks} == chunks
    _datatree_equals_our_reader(xr.open_datatree(str(path), engine="zarr"), Store(str(path)))
    after = Store(str(path)).read_clip(0)
    np.testing.assert_array_equal(after.latents, before.latents)
    np.testing.assert_array_equal(after.features, before.features)
    assert len(pd.read_parquet(path / "clips.parquet")) == len(Store(str(path)).clip_table["id"])


def test_rollout_refreshes_consolidated_metadata_our_reader_never_needs(tmp_path):
    path = tmp_path / "s.zarr"
    writer, _, _ = make_store(path)
    writer.create_pred_features("f" * 64)
    # consolidated metadata is stale until the rollout finishes; our reader sees the new array anyway
    assert "clips/pred_features" not in dict(zarr.open_consolidated(str(path), zarr_format=3).members(max_depth=None))
    assert Store(str(path)).pred_features_fingerprint == "f" * 64
    store = Store(str(path))
    for i in range(len(store)):
        writer.write_pred_features(store.row(i), np.ones(store.group["clips/pred_features"].shape[1:], np.float16))
    writer.finish_pred_features()
    pred = zarr.open_consolidated(str(path), zarr_format=3)["clips/pred_features"]
    assert pred.metadata.dimension_names == ("clip_row", "future_latent_frame", "y", "x", "pca_channel")
    assert xr.open_datatree(str(path), engine="zarr")["clips"]["pred_features"].shape == pred.shape


def test_a_copy_is_published_too(tmp_path):
    make_store(tmp_path / "s.zarr")
    copy_store(str(tmp_path / "s.zarr"), str(tmp_path / "c.zarr"), channels=16, progress=False)
    dt = xr.open_datatree(str(tmp_path / "c.zarr"), engine="zarr")
    assert dt["frames"]["features"].shape[-1] == dt["pca"]["components"].shape[0] == 16
    copied = Store(str(tmp_path / "c.zarr"))
    assert list(pd.read_parquet(tmp_path / "c.zarr" / "clips.parquet")["id"]) == list(copied.clip_table["id"])
    assert copied.verify()["ok"]
