"""Hostile inputs (issue 15): what the product did not write is never destroyed, damage is never handed
out as data, every bad input is one line naming the file, and nothing read from a manifest sizes an
allocation unchecked. Each test states the finding it covers."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from pipeline.store.format import DamagedStoreError, StoreError
from pipeline.store.reader import Store
from tests.store_factory import chunk_path, make_store

ROOT = Path(__file__).resolve().parents[1]


def _job(module: str, *args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        **kw,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The job failed with exactly one `error:` line (no traceback) holding every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


@pytest.fixture(scope="module")
def s3_url(s3_server):
    """The session's S3-protocol server (tests/conftest.py) with this module's bucket."""
    s3_server.create_bucket("hostile")
    return {"bucket": "hostile", "options": s3_server.storage_options}


# ---- finding 1: --out at a folder that is not a store ------------------------------------------------
def test_a_folder_that_is_not_a_store_is_never_cleared_whatever_the_flags(tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    (out / "sub" / "notes.md").write_text("and me")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="is not empty and is not a re2pix store"):
            make_store(out, scenes=1, frames=25, overwrite=overwrite)
    assert (out / "precious.txt").read_text() == "keep me" and (out / "sub" / "notes.md").read_text() == "and me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt", "sub"]
    # a plain Zarr group of someone else's is not ours either
    zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(StoreError, match="not a re2pix store"):
        make_store(tmp_path / "theirs.zarr", scenes=1, frames=25, overwrite=True)
    assert dict(zarr.open_group(str(tmp_path / "theirs.zarr"), mode="r").attrs) == {"hello": 1}


def test_overwrite_replaces_a_store_of_ours_and_leaves_other_files_beside_it(tmp_path):
    out = tmp_path / "s.zarr"
    make_store(out, scenes=1, frames=25)
    (out / "README.txt").write_text("a note the user put into the store's folder")
    _, _, written = make_store(out, scenes=1, frames=29, seed=5, overwrite=True)
    assert (out / "README.txt").read_text().startswith("a note")
    store = Store(str(out))
    assert len(store) == 2
    np.testing.assert_array_equal(store.read_latents(1), written[("latents", 1)])
    make_store(tmp_path / "empty", scenes=1, frames=25) if (tmp_path / "empty").mkdir() is None else None
    assert len(Store(str(tmp_path / "empty"))) == 1  # an empty folder is fine


def test_store_writer_refuses_a_non_store_prefix_on_s3(s3_url):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_url["options"])
    fs.pipe_file(f"{s3_url['bucket']}/data/precious.txt", b"keep me")
    with pytest.raises(StoreError, match="is not empty and is not a re2pix store"):
        make_store(
            f"s3://{s3_url['bucket']}/data", scenes=1, frames=25, overwrite=True, storage_options=s3_url["options"]
        )
    assert fs.cat_file(f"{s3_url['bucket']}/data/precious.txt") == b"keep me"


# ---- finding 3: readers hand out damage as data --------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    _, index, written = make_store(path, channel_chunk=16)
    return path, index, written


def test_a_deleted_feature_shard_is_an_error_naming_array_and_row(store):
    path, index, _ = store
    row = int(index.clips[1].feature_rows[-1])  # the last frame of clip 1 (clip 0 does not use it)
    chunk_path(path, "frames/features", row).unlink()
    s = Store(str(path))
    s.read_features(0)
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{row}\] is damaged .*missing") as e:
        s.read_features(1)
    assert (e.value.array, e.value.row) == ("frames/features", row)
    assert str(path) in str(e.value)


def test_a_missing_inner_chunk_of_a_shard_is_an_error_not_zeros(store):
    path, index, written = store
    row = int(index.clips[0].feature_rows[2])
    # rewrite the frame with channels 16..31 equal to the fill value: zarr leaves such a chunk out of the shard
    # index unless told to store every chunk; forge that by writing through a plain zarr handle
    a = zarr.open_array(str(path / "frames" / "features"), mode="r+", config={"write_empty_chunks": False})
    frame = written[("features", row)].copy()
    frame[..., 16:32] = 0
    a[row] = frame
    with pytest.raises(DamagedStoreError, match=r"channels 16..31 is missing"):
        Store(str(path)).read_features(0)
    assert Store(str(path)).read_features(0, channels=16).shape[-1] == 16  # the chunks before it are fine


def test_a_deleted_latents_chunk_is_an_error(store):
    path, _, _ = store
    chunk_path(path, "clips/latents", 2).unlink()
    with pytest.raises(DamagedStoreError, match=r"clips/latents\[2\] is damaged .*missing"):
        Store(str(path)).read_clip(2)


@pytest.mark.parametrize("array", ["frames/features", "clips/latents"])
def test_a_flipped_byte_inside_a_chunk_fails_its_checksum(store, array):
    path, index, _ = store
    row = int(index.clips[3].feature_rows[0]) if array == "frames/features" else 3
    _flip(chunk_path(path, array, row), 40)
    with pytest.raises(DamagedStoreError, match=rf"{array}\[{row}\] is damaged \(crc32c checksum mismatch"):
        Store(str(path)).read_clip(3)


def test_uncompressed_reads_check_each_chunk_they_read_and_only_those(store):
    """The direct path of `--compression none`: a changed byte in the third channel chunk fails a read of all
    channels, not a prefix that ends before it; a shard index forged to point past the file is damage."""
    path, index, written = store
    row = int(index.clips[0].feature_rows[3])
    chunk_bytes = 8 * 14 * 16 * 2  # TINY geometry: [8, 14] patches, channel chunks of 16
    _flip(chunk_path(path, "frames/features", row), 2 * (chunk_bytes + 4) + 7)
    s = Store(str(path))
    assert s._direct, "uncompressed local stores are read directly"
    np.testing.assert_array_equal(s.read_features(0, channels=32)[3], written[("features", row)][..., :32])
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{row}\] is damaged \(crc32c checksum mismatch"):
        s.read_features(0)
    forged = int(index.clips[1].feature_rows[-1])  # not a frame of clip 0
    p = chunk_path(path, "frames/features", forged)
    data = bytearray(p.read_bytes())
    entries = np.frombuffer(bytes(data[-(16 * 4 + 4) : -4]), np.uint64).copy()
    entries[0] = len(data)  # the first chunk's offset: the end of the file
    body = entries.tobytes()
    data[-(16 * 4 + 4) :] = body + google_crc32c.value(body).to_bytes(4, "little")  # a valid index checksum
    p.write_bytes(bytes(data))
    with pytest.raises(DamagedStoreError, match="its shard index places the chunk of channels 0..15 outside the file"):
        s.read_feature_row(forged)


def test_a_shard_with_its_chunks_out_of_order_reads_right_after_an_in_order_one(store):
    """Another writer may store a shard's chunks in any order (its index says where): such a shard is read
    chunk by chunk, and must read right after an in-order shard was read a block of rows at a time."""
    path, index, written = store
    rows = [int(r) for r in index.clips[0].feature_rows]
    p = chunk_path(path, "frames/features", rows[1])
    data = p.read_bytes()
    n = len(data) // (8 * 14 * 16 * 2 + 4)  # TINY geometry: [8, 14] patches, channel chunks of 16
    size, body = (len(data) - (16 * n + 4)) // n, data[: -(16 * n + 4)]
    chunks = [body[j * size : (j + 1) * size] for j in range(n)]
    entries = np.array([[(n - 1 - j) * size, size] for j in range(n)], np.uint64)  # chunk j stored (n-1-j)th
    table = entries.tobytes()
    p.write_bytes(b"".join(reversed(chunks)) + table + google_crc32c.value(table).to_bytes(4, "little"))
    s = Store(str(path))
    features = s.read_features(0)  # rows[0] in order (blocks of rows), then rows[1] chunk by chunk
    blocks = s.read_feature_blocks(0, np.empty((7, 4, 8, 14, 16), np.float16))  # each chunk where its index says
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(features[k], written[("features", r)])
        np.testing.assert_array_equal(blocks[k].transpose(1, 2, 0, 3).reshape(8, 14, 64), written[("features", r)])


@pytest.mark.parametrize("compression", ["blosc-lz4", "zstd:1"])
def test_compressed_stores_read_through_zarr_detect_the_same_damage(tmp_path, compression):
    path = tmp_path / "s.zarr"
    _, index, written = make_store(path, channel_chunk=16, compression=compression)
    s = Store(str(path))
    assert not s._direct  # compressed chunks go through Zarr's codecs
    row = int(index.clips[0].feature_rows[1])
    np.testing.assert_array_equal(s.read_features(0)[1], written[("features", row)])
    a = zarr.open_array(str(path / "frames" / "features"), mode="r+", config={"write_empty_chunks": False})
    frame = written[("features", row)].copy()
    frame[..., 32:48] = 0  # zarr leaves such a chunk out of the shard when not told to store every chunk
    a[row] = frame
    with pytest.raises(DamagedStoreError, match=r"channels 32..47 is missing"):
        s.read_features(0)
    _flip(chunk_path(path, "clips/latents", 1), 30)
    with pytest.raises(DamagedStoreError, match=r"clips/latents\[1\] is damaged"):
        s.read_latents(1)
    chunk_path(path, "frames/features", row).unlink()
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{row}\] is damaged .*missing"):
        s.read_features(0)


def test_a_truncated_shard_is_damage_naming_its_row(store):
    path, index, _ = store
    row = int(index.clips[0].feature_rows[0])
    p = chunk_path(path, "frames/features", row)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{row}\]"):
        Store(str(path)).read_features(0)


# ---- finding 2: resume trusts damaged weights --------------------------------------------------------
STAGE1 = {
    "model": {"size": "tiny", "dim": 48, "num_heads": 4, "num_layers": 1},
    "batch_size": 2,
    "steps": 4,
    "lr": 0.002,
    "log_every": 1,
    "ckpt_every": 2,
    "keep_checkpoints": 3,
}


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "store.zarr"
    make_store(path, scenes=2, frames=29, channel_chunk=16)
    return str(path)


def _train_args(store, run_dir, *extra):
    return [
        "--stage",
        "1",
        "--store",
        store,
        "--run-dir",
        str(run_dir),
        "--val-clips",
        "1",
        "--no-progress",
        "--threads",
        "1",
        "--workers",
        "0",
        "--stage1",
        json.dumps(STAGE1),
        *extra,
    ]


@pytest.fixture
def trained(train_store, tmp_path):
    from jobs.train import main as train_main

    train_main(_train_args(train_store, tmp_path))
    return tmp_path / "stage1"


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_resume_skips_a_damaged_latest_checkpoint_for_the_newest_intact_one(train_store, trained, damage, caplog):
    from jobs.train import main as train_main
    from model.checkpoint import read_meta, verify_checkpoint

    weights = trained / "checkpoints" / "step-000004" / "model.safetensors"
    if damage == "flipped byte":
        _flip(weights, weights.stat().st_size - 10)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level("INFO"):
        train_main(_train_args(train_store, trained.parent, "--resume", "--steps", "6"))
    warned = [r.getMessage() for r in caplog.records if "skipping a damaged checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "step-000004/model.safetensors" in warned[0]
    assert any("resuming from" in r.getMessage() and "step-000002" in r.getMessage() for r in caplog.records)
    for step in (4, 6):  # step 4 was trained again from step 2 and written afresh: nothing damaged is kept
        meta = verify_checkpoint(trained / "checkpoints" / f"step-{step:06d}")
        assert meta["step"] == step
    assert read_meta(trained / "checkpoints" / "step-000006")["step"] == 6


def test_strict_resume_stops_at_a_damaged_checkpoint_in_one_line(train_store, trained):
    weights = trained / "checkpoints" / "step-000004" / "model.safetensors"
    _flip(weights, weights.stat().st_size - 10)
    proc = _job("jobs.train", *_train_args(train_store, trained.parent, "--resume", "--strict-resume"))
    _one_line_error(proc, "step-000004/model.safetensors does not match the fingerprint")


def test_a_pickled_state_file_is_refused_naming_the_file(trained):
    from model.checkpoint import CheckpointError, find_resumable

    state = trained / "checkpoints" / "step-000004" / "state.pt"
    import torch

    torch.save({"step": 4, "evil": os.getcwd}, state)  # a function, pickled by reference: code, not data
    with pytest.raises(CheckpointError, match=r"step-000004/state.pt holds objects that weights-only loading"):
        find_resumable(trained, strict=True)
    assert find_resumable(trained)[0].name == "step-000002"


def test_a_pickle_in_place_of_the_weights_is_refused_naming_the_file(trained):
    import torch

    from model.checkpoint import CheckpointError, load_verified

    torch.save({"w": torch.zeros(2)}, trained / "checkpoints" / "step-000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-000004/model.safetensors is not a readable safetensors file"):
        load_verified(trained, ("stage1",), "model")


def test_training_refuses_a_run_folder_that_is_not_a_run(train_store, tmp_path):
    from jobs.train import main as train_main
    from model.checkpoint import CheckpointError

    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="is not empty and is not a re2pix run"):
        train_main(_train_args(train_store, tmp_path))
    assert sorted(p.name for p in (tmp_path / "stage1").iterdir()) == ["thesis.tex"]


# ---- finding 4: verify's blind spots ------------------------------------------------------------------
def test_verify_checks_every_row_without_markers_and_lists_decode_errors_as_bad_rows(store):
    path, index, _ = store
    (path / "progress" / "unit-000000.json").unlink()  # no marker: rows are still checked
    f_missing, f_truncated = int(index.clips[0].feature_rows[1]), int(index.clips[3].feature_rows[-1])
    chunk_path(path, "frames/features", f_missing).unlink()
    p = chunk_path(path, "frames/features", f_truncated)
    p.write_bytes(p.read_bytes()[:100])
    _flip(chunk_path(path, "clips/latents", 2), 50)
    a = zarr.open_array(str(path / "clips" / "latents"), mode="r+")
    z = a[1]
    z[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    a[1] = z
    report = Store(str(path)).verify()
    assert not report["ok"]
    bad = {(b["array"], b["row"]): b["reason"] for b in report["bad_rows"]}
    assert set(bad) == {
        ("frames/features", f_missing),
        ("frames/features", f_truncated),
        ("clips/latents", 2),
        ("clips/latents", 1),
    }
    assert "missing" in bad[("frames/features", f_missing)]
    assert "crc32c" in bad[("clips/latents", 2)]
    assert bad[("clips/latents", 1)] == "3 NaN/Inf values" and report["nonfinite"] == {"clips/latents": 3}
    assert report["checked"] == {"frames/features": len(index.frames), "clips/latents": 4}

    proc = _job("jobs.store", "verify", path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"BAD frames/features[{f_missing}]: its shard file c/{f_missing}/0/0/0 is missing" in proc.stdout
    assert "4 problems" in proc.stdout.splitlines()[-1]
    proc = _job("jobs.store", "verify", path, "--json")
    assert proc.returncode == 1 and len(json.loads(proc.stdout)["bad_rows"]) == 4


def test_verify_and_check_compare_the_pca_basis_with_the_fingerprint(tmp_path):
    make_store(tmp_path / "a.zarr", scenes=1, frames=25)
    make_store(tmp_path / "b.zarr", scenes=1, frames=25)
    comps = zarr.open_array(str(tmp_path / "a.zarr" / "pca" / "components"), mode="r+")
    comps[0] = comps[1]  # same shape, other numbers: features would be read in another space
    report = Store(str(tmp_path / "a.zarr")).verify()
    assert [b["array"] for b in report["bad_rows"]] == ["pca"] and "the manifest's fingerprint" in report["bad_rows"][
        0
    ]["reason"]
    _one_line_error(
        _job("jobs.store", "check", tmp_path / "b.zarr", tmp_path / "a.zarr"), "a.zarr: pca: its arrays hash to"
    )
    assert _job("jobs.store", "check", tmp_path / "b.zarr", tmp_path / "b.zarr").returncode == 0


def test_a_swapped_or_wrong_shaped_basis_is_refused_on_open(tmp_path):
    import shutil

    make_store(tmp_path / "a.zarr", scenes=1, frames=25)
    make_store(tmp_path / "c.zarr", scenes=1, frames=25, basis_seed=3)
    shutil.rmtree(tmp_path / "a.zarr" / "pca")
    shutil.copytree(tmp_path / "c.zarr" / "pca", tmp_path / "a.zarr" / "pca")
    with pytest.raises(StoreError, match="pca/ holds basis .* but the manifest says"):
        Store(str(tmp_path / "a.zarr"))
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    g["pca"].create_array("components", shape=(8, 128), dtype="float32", overwrite=True)
    _one_line_error(
        _job("jobs.store", "verify", tmp_path / "c.zarr"),
        "pca/components has shape [8, 128], but the manifest's counts and geometry say [64, 128]",
    )


# ---- findings 7 and 10: one line naming the file for every bad input --------------------------------
def test_store_tools_report_project_errors_in_one_line(tmp_path, store):
    path, _, _ = store
    make_store(tmp_path / "other.zarr", scenes=1, frames=25, basis_seed=4)
    _one_line_error(_job("jobs.store", "check", path, tmp_path / "other.zarr"), "pca.fingerprint differs")
    _one_line_error(_job("jobs.store", "info", tmp_path / "nowhere.zarr"), "nowhere.zarr is not a re2pix store")


def test_export_wds_with_too_many_channels_writes_nothing(store, tmp_path):
    path, _, _ = store
    out = tmp_path / "shards"
    _one_line_error(
        _job("jobs.store", "export-wds", path, out, "--channels", 9999), "channels must be in 1..64, got 9999"
    )
    assert not out.exists()


def test_export_wds_refuses_a_foreign_folder_and_replaces_only_its_own_export(store, tmp_path):
    from pipeline.store.wds import export_webdataset, shard_urls

    path, _, _ = store
    out = tmp_path / "mine"
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreError, match="not a re2pix WebDataset export"):
        export_webdataset(Store(str(path)), str(out), overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["photo.jpg"]
    first = export_webdataset(Store(str(path)), str(tmp_path / "wds"), shard_size_mb=0.05, progress=False)
    (tmp_path / "wds" / "NOTES.txt").write_text("mine")
    with pytest.raises(StoreError, match="already holds a WebDataset export; pass --overwrite"):
        export_webdataset(Store(str(path)), str(tmp_path / "wds"), progress=False)
    again = export_webdataset(Store(str(path)), str(tmp_path / "wds"), channels=16, progress=False, overwrite=True)
    assert len(again) == 1 < len(first) and shard_urls(str(tmp_path / "wds")) == again
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == [
        "NOTES.txt",
        "README.md",
        "data",
        "manifest.json",
        "pca.npz",
    ]
    assert [p.name for p in (tmp_path / "wds" / "data").iterdir()] == ["shard-000000.tar"]


def test_a_failed_export_is_never_taken_for_finished(store, tmp_path):
    from pipeline.store.wds import export_webdataset, shard_urls

    path, index, _ = store
    chunk_path(path, "clips/latents", 3).unlink()  # the last clip: shards before it were written
    with pytest.raises(DamagedStoreError, match=r"clips/latents\[3\]"):
        export_webdataset(Store(str(path)), str(tmp_path / "wds"), shard_size_mb=0.05, progress=False)
    assert not (tmp_path / "wds" / "manifest.json").exists()  # its finished shards stay, for a rerun to resume
    with pytest.raises(StoreError, match="no manifest.json"):
        shard_urls(str(tmp_path / "wds"))


def _tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_hostile_npy_members_are_refused_naming_the_shard_and_the_member(tmp_path):
    from pipeline.store.wds import iter_webdataset

    good = {"c0.json": b"{}", "c0.latents.npy": _npy_bytes(np.zeros((16, 7, 12, 20), np.float16))}
    cases = {
        "pickle": ({**good, "c0.features.npy": _npy_bytes(np.array([{"x": 1}], dtype=object))}, "holds object values"),
        "huge": (
            {
                **good,
                "c0.features.npy": _npy_bytes(np.zeros((7, 8, 14, 4), np.float16)).replace(
                    b"(7, 8, 14, 4)", b"(7, 8, 14, 4000000000)", 1
                ),
            },
            "bytes of data, its header says",
        ),
        "3d": ({**good, "c0.features.npy": _npy_bytes(np.zeros((7, 8, 14), np.float16))}, "has shape [7, 8, 14]"),
        "garbage": ({**good, "c0.features.npy": b"not an npy"}, "is not a valid .npy file"),
    }
    for name, (members, reason) in cases.items():
        shard = _tar(tmp_path / f"{name}.tar", members)
        with pytest.raises(StoreError, match=rf"{name}.tar: member c0.features.npy .*{re.escape(reason)}"):
            list(iter_webdataset([shard]))


def test_a_shard_member_with_the_wrong_shape_for_its_manifest_is_refused(store, tmp_path):
    from pipeline.store.wds import export_webdataset, iter_webdataset

    path, _, _ = store
    shards = export_webdataset(Store(str(path)), str(tmp_path / "wds"), channels=16, progress=False)
    members = {}
    with tarfile.open(shards[0]) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    first = sorted(members)[0].split(".")[0]
    members[f"{first}.features.npy"] = _npy_bytes(np.zeros((7, 8, 14, 32), np.float16))  # 32 channels, not 16
    _tar(Path(shards[0]), members)
    with pytest.raises(
        StoreError,
        match=rf"shard-000000.tar: member {first}.features.npy has shape \[7, 8, 14, 32\], "
        r"the export's manifest says \[7, 8, 14, 16\]",
    ):
        list(iter_webdataset(shards))


# ---- finding 9: manifest values are trusted without bounds -----------------------------------------
def test_a_webdataset_manifest_claiming_1e9_channels_is_refused_before_the_trainer_allocates(
    store, tmp_path, train_store
):
    from pipeline.store.wds import export_webdataset

    path, _, _ = store
    export_webdataset(Store(str(path)), str(tmp_path / "wds"), progress=False)
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    manifest["webdataset"]["channels"] = 10**9
    (tmp_path / "wds" / "manifest.json").write_text(json.dumps(manifest))
    proc = _job("jobs.train", *_train_args(str(tmp_path / "wds"), tmp_path / "run"))
    _one_line_error(proc, "manifest.json: webdataset.channels is 1000000000, the geometry has 1..64")
    manifest["webdataset"]["channels"] = 16
    manifest["geometry"]["num_pca_channels"] = 10**9
    (tmp_path / "wds" / "manifest.json").write_text(json.dumps(manifest))
    from pipeline.store.wds import read_wds_manifest

    with pytest.raises(StoreError, match="geometry is refused: geometry num_pca_channels=1000000000 is out of bounds"):
        read_wds_manifest(str(tmp_path / "wds"))


def test_store_array_shapes_are_checked_against_the_counts(store):
    path, _, _ = store
    g = zarr.open_group(str(path), mode="r+")
    counts = dict(g.attrs["counts"], clips=10**6)
    g.attrs["counts"] = counts
    with pytest.raises(StoreError, match=r"clips/latents has shape \[4, 16, 7, 12, 20\], but the manifest's counts"):
        Store(str(path))
    g.attrs["counts"] = dict(counts, clips=4)
    geometry = dict(g.attrs["geometry"], latent_channels=10**7)
    g.attrs["geometry"] = geometry
    with pytest.raises(StoreError, match="geometry latent_channels=10000000 is out of bounds"):
        Store(str(path))


def test_rollout_reports_a_damaged_checkpoint_in_one_line(trained, train_store):
    weights = trained / "checkpoints" / "step-000004" / "model.safetensors"
    _flip(weights, weights.stat().st_size - 10)  # a weight's byte: the file still parses
    _one_line_error(
        _job("jobs.rollout", "--checkpoint", trained, "--store", train_store, "--no-progress"),
        "step-000004/model.safetensors does not match the fingerprint",
    )


@pytest.mark.parametrize("array", ["clips/valid", "clips/feature_rows", "clips/id"])
def test_a_missing_chunk_of_the_clip_table_is_damage_not_an_empty_or_shifted_store(store, array):
    path, _, _ = store
    two_axes = array in ("clips/feature_rows", "clips/id")  # ids are UTF-8 bytes in uint8 [n, width]
    path.joinpath(*array.split("/"), "c", *(["0", "0"] if two_axes else ["0"])).unlink()
    with pytest.raises(DamagedStoreError, match=re.escape(array)):
        assert Store(str(path)).clip_ids is None  # not reached: opening or reading the ids refuses


# ---- kill and corruption cases that already held: keep them holding ----------------------------------
def test_a_checkpoint_half_written_by_a_kill_is_never_resumed_from(trained):
    from model.checkpoint import find_resumable

    half = trained / "checkpoints" / ".tmp-killed"  # a save killed before its rename
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert find_resumable(trained) == (trained / "checkpoints" / "step-000004", [])


def test_an_unfinished_store_is_not_served_and_a_partial_marker_is_not_a_done_unit(tmp_path):
    from pipeline.store.format import IncompleteStoreError
    from pipeline.store.writer import StoreWriter

    w, _, _ = make_store(tmp_path / "s.zarr", scenes=1, frames=25, finalize=False)
    (tmp_path / "s.zarr" / "progress" / ".tmp-0123").write_bytes(b'{"unit": "unit-0000')  # killed mid-write
    assert StoreWriter(str(tmp_path / "s.zarr")).done_units() == {"unit-000000"}
    with pytest.raises(IncompleteStoreError, match="never finished"):
        Store(str(tmp_path / "s.zarr"))


@pytest.mark.parametrize("workers", ["0", "1"])
def test_the_trainer_stops_on_a_damaged_chunk_in_one_line_instead_of_training_on_zeros(tmp_path, workers):
    path = tmp_path / "s.zarr"
    make_store(path, scenes=2, frames=29, channel_chunk=16)
    store = Store(str(path))
    row = int(store._feature_rows[store.row(0)][3])  # Stage 1 reads no latents; every window holds frame 3
    chunk_path(path, "frames/features", row).unlink()
    proc = _job("jobs.train", *_train_args(str(path), tmp_path / "run", "--workers", workers))  # the last one counts
    _one_line_error(proc, str(path), f"frames/features[{row}] is damaged (its shard file c/{row}/0/0/0 is missing")


def test_channel_blocked_reads_refuse_each_kind_of_damage_they_meet(store):
    """read_feature_blocks (the trainer's path: chunks straight into the batch) checks what read_features
    checks: a changed byte, an inner chunk missing from its shard, an index pointing past the file, a
    deleted shard; a prefix that ends before the damage reads."""
    path, index, written = store
    s = Store(str(path))
    rows = [int(r) for r in index.clips[0].feature_rows]
    out = np.empty((7, 4, 8, 14, 16), np.float16)  # [F, nb, H, W, k]: channels 0..63 in chunks of 16
    s.read_feature_blocks(0, out)
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(out[k].transpose(1, 2, 0, 3).reshape(8, 14, 64), written[("features", r)])
    chunk_bytes = 8 * 14 * 16 * 2
    _flip(chunk_path(path, "frames/features", rows[2]), 3 * (chunk_bytes + 4) + 9)  # inside channels 48..63
    s.read_feature_blocks(0, out[:, :3])  # channels 0..47 only: the damaged chunk is not read
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{rows[2]}\] is damaged \(crc32c checksum"):
        s.read_feature_blocks(0, out)
    a = zarr.open_array(str(path / "frames" / "features"), mode="r+", config={"write_empty_chunks": False})
    frame = written[("features", rows[4])].copy()
    frame[..., 16:32] = 0  # zarr leaves an all-fill chunk out of the shard unless told to store every chunk
    a[rows[4]] = frame
    with pytest.raises(DamagedStoreError, match=r"channels 16..31 is missing from its shard"):
        s.read_feature_blocks(0, out[4:5, :2], frames=slice(4, 5))
    chunk_path(path, "frames/features", rows[5]).unlink()
    with pytest.raises(DamagedStoreError, match=rf"frames/features\[{rows[5]}\] is damaged \(its shard file"):
        s.read_feature_blocks(0, out[5:6, :2], frames=slice(5, 6))


def test_an_export_killed_mid_way_resumes_to_the_same_shards(store, tmp_path):
    path, _, _ = store
    killed = (  # SIGKILL at the fourth clip: no cleanup runs, as when a machine goes away
        "import os, signal\n"
        "from pipeline.store.reader import Store\n"
        "from pipeline.store.wds import export_webdataset\n"
        "read, seen = Store.read_clip, []\n"
        "def dying(self, *a, **kw):\n"
        "    seen.append(1)\n"
        "    if len(seen) == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return read(self, *a, **kw)\n"
        "Store.read_clip = dying\n"
        f"export_webdataset(Store({str(path)!r}), {str(tmp_path / 'wds')!r}, shard_size_mb=0.05, progress=False)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert subprocess.run([sys.executable, "-c", killed], env=env, cwd=ROOT, timeout=300).returncode == -9
    assert list((tmp_path / "wds").glob("data/shard-*.tar")) and not (tmp_path / "wds" / "manifest.json").exists()
    again = _job("jobs.store", "export-wds", path, tmp_path / "wds", "--shard-size-mb", "0.05")
    assert again.returncode == 0 and "resuming the export" in again.stdout, again.stderr
    clean = _job("jobs.store", "export-wds", path, tmp_path / "clean", "--shard-size-mb", "0.05")

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    names = files(tmp_path / "clean")
    assert names == files(tmp_path / "wds") and "data/shard-000000.tar" in names, clean.stderr
    assert all((tmp_path / "wds" / n).read_bytes() == (tmp_path / "clean" / n).read_bytes() for n in names)
