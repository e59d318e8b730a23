"""Growing a store: `make cache` on a finished store whose source gained scenes appends only them, under the
store's own basis and settings (tiny encoders, the synthetic source, the session's Ray cluster)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import run_cache
from pipeline.clips import build_clip_index, grow_index
from pipeline.errors import Re2pixError
from pipeline.store.format import IncompleteStoreError, StoreError, check_compatible
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store
from pipeline.store.writer import StoreWriter, digest, settings_digest, store_settings, stored_index
from pipeline.units import plan_units
from tests.store_factory import ENCODERS, CountingSource, make_store, random_basis
from tests.test_cache import SYNTH, tiny_config

GROWN = {**SYNTH, "num_scenes": 4}  # the source gained two scenes: scene-0002 and scene-0003
ROOT = Path(__file__).resolve().parents[1]


# ---- the writer alone (no encoder, no cluster) -------------------------------------------------------
def _grow(path, source, variants=("orig",), **kw):
    """Start growing the store at `path` to `source`'s clips, as the cache job does: (writer, index, clips, frames)."""
    ids, rows, frames = stored_index(str(path))
    index = grow_index(ids, rows, frames, build_clip_index(source, TINY, stride=4, progress=False))
    w = StoreWriter.create(
        str(path),
        **{
            "index": index,
            "geometry": TINY,
            "basis": random_basis(TINY),
            "source_info": source.describe(),
            "encoders": ENCODERS,
            "latent_norm": {"mean": [0.0] * 16, "std": [1.0] * 16},
            "variants": variants,
            "clip_stride": 4,
            **kw,
        },
        grow=(len(ids), len(frames)),
    )
    return w, index, len(ids), len(frames)


def test_a_grown_index_keeps_the_stored_rows_and_new_units_encode_only_new_frames():
    old = build_clip_index(CountingSource(2, 29), TINY, stride=4, progress=False)
    ids = [c.clip_id for c in old.clips]
    # two new scenes, and each old scene 4 frames longer: one new clip each, on 6 stored frames and 1 new one
    index = grow_index(
        ids,
        [list(c.feature_rows) for c in old.clips],
        old.frames,
        build_clip_index(CountingSource(4, 33), TINY, stride=4, progress=False),
    )
    assert [c.clip_id for c in index.clips[:4]] == ids and index.frames[:16] == old.frames
    assert [c.clip_id for c in index.clips[4:6]] == ["scene-00-000008", "scene-01-000008"]
    assert index.clips[4].feature_rows == (2, 3, 4, 5, 6, 7, 16)  # frames 8..28 of scene 0 are stored rows
    units = plan_units(index, 1, first_clip=4, stored_frames=16, prefix="append1-unit")
    assert [u.unit_id for u in units][:2] == ["append1-unit-000000", "append1-unit-000001"]
    assert [c for u in units for c, _, _ in u.clips] == list(range(4, len(index.clips)))
    owned = sorted(r for u in units for r, _ in u.own)
    assert owned == list(range(16, len(index.frames)))  # each new frame once, no stored frame again
    with pytest.raises(ValueError, match="scene-00-000004 is no longer in the source"):
        grow_index(
            ids,
            [list(c.feature_rows) for c in old.clips],
            old.frames,
            build_clip_index(CountingSource(2, 27), TINY, stride=4, progress=False),
        )


def test_the_writer_appends_rows_after_the_stored_ones_and_reads_unfinished_until_finalize(tmp_path):
    path = tmp_path / "s.zarr"
    variants = ("orig", "hflip")
    _, _, written = make_store(path, variants=variants)
    before = _row_files(path)
    w, index, clips, frames = _grow(path, CountingSource(4), variants)
    with pytest.raises(IncompleteStoreError):  # a half-appended store is never taken for finished
        Store(str(path))
    assert Store(str(path), allow_incomplete=True).clip_ids == [c.clip_id for c in index.clips[:4]]
    assert (clips, frames) == (4, 16) and w.manifest["appending"]["generation"] == 1
    rng, digests = np.random.default_rng(1), {}
    for r in range(frames * 2, len(index.frames) * 2):
        digests[f"features/{r}"] = w.write_features(r, rng.standard_normal(TINY.features_shape[1:]))
    for r in range(clips * 2, len(index.clips) * 2):
        digests[f"latents/{r}"] = w.write_latents(r, rng.standard_normal(TINY.latents_shape))
    rows = {"clip_rows": range(clips * 2, 16), "frame_rows": range(frames * 2, 64)}
    w.mark_unit_done("append1-unit-000000", **rows, digests=digests)
    w.finalize(["append1-unit-000000"])
    store, scratch = (
        Store(str(path)),
        Store(str(make_store(tmp_path / "scratch.zarr", scenes=4, variants=variants)[0].location)),
    )
    assert len(store) == 8 and store.manifest["generation"] == 1 and store.manifest["appending"] is None
    for name in ("clips/id", "clips/feature_rows", "clips/timestamps", "frames/scene", "frames/index", "frames/path"):
        np.testing.assert_array_equal(store.group[name][...], scratch.group[name][...])  # the same index
    assert {k: v for k, v in _row_files(path).items() if k in before} == before  # stored rows untouched
    np.testing.assert_array_equal(store.group["clips/latents"][3], written[("latents", 3)])
    assert store.verify()["bad_rows"] == [] and store.manifest["settings_digest"] == scratch.manifest["settings_digest"]


def test_a_store_grows_only_under_its_own_settings(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"made with other settings \(compression: 'none' there, 'zstd' now\)"):
        _grow(tmp_path / "s.zarr", CountingSource(4), compression="zstd")
    with pytest.raises(StoreError, match=r"made with other settings \(encoders.vae.sha256: "):
        _grow(
            tmp_path / "s.zarr",
            CountingSource(4),
            encoders={**ENCODERS, "vae": {**ENCODERS["vae"], "sha256": "c" * 64}},
        )
    assert Store(str(tmp_path / "s.zarr")).manifest["counts"]["clips"] == 4  # refused before any write


# ---- the cache job ------------------------------------------------------------------------------------
def _row_files(store: Path) -> dict[str, int]:
    """Every chunk file of the row arrays, with its modification time."""
    return {
        str(p.relative_to(store)): p.stat().st_mtime_ns
        for name in ("frames/features", "clips/latents")
        for p in (store / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


def _clip_digests(store: Store) -> dict[str, tuple[str, str]]:
    """clip id -> digests of its latents and of its feature frames, wherever the rows are."""
    return {
        cid: (digest(store.read_latents(i)), digest(store.read_features(i))) for i, cid in enumerate(store.clip_ids)
    }


@pytest.fixture(scope="module")
def grown(ray_address, tmp_path_factory):
    """A 2-scene store, a copy of that old state, and the store after its source gained 2 scenes."""
    tmp = tmp_path_factory.mktemp("grow")
    out, old = tmp / "store.zarr", tmp / "old.zarr"
    run_cache(tiny_config(out))
    shutil.copytree(out, old)
    before = _row_files(out)
    summary = run_cache(tiny_config(out, source_options=GROWN))
    return out, old, before, summary


def test_new_scenes_are_appended_alone_under_the_stores_basis(grown):
    out, old, before, summary = grown
    a, o = Store(str(out)), Store(str(old))
    # 2 new scenes x 2 clips, one clip per unit: only their 4 units ran
    assert summary["appended_clips"] == 4 and summary["encoded_units"] == 4 and summary["valid_clips"] == 8
    assert a.clip_ids[:4] == o.clip_ids and a.clip_ids[4:] == [f"scene-000{s}-00000{k}" for s in (2, 3) for k in (0, 4)]
    assert {k: v for k, v in _row_files(out).items() if k in before} == before  # no stored row rewritten
    assert len(_row_files(out)) == 2 * len(before)
    assert a.basis.fingerprint == o.basis.fingerprint and a.manifest["generation"] == 1
    assert a.manifest["counts"]["clips"] == 8 and a.manifest["counts"]["frames"] == 32
    card = json.loads((out / "card.json").read_text())["holds"]
    assert (card["indexed_clips"], card["usable_clips"], card["generation"]) == (8, 8, 1)
    assert a.manifest["settings_digest"] == o.manifest["settings_digest"] == settings_digest(store_settings(a.manifest))
    report = a.verify()
    assert report["bad_rows"] == [] and report["rows_without_digest"] == 0
    check_compatible([o.manifest, a.manifest], [str(old), str(out)])  # training mixes both states
    again = run_cache(tiny_config(out, source_options=GROWN))
    assert again["already_complete"] and again["valid_clips"] == 8


def test_the_appended_store_equals_one_cached_from_scratch_with_its_basis(grown, tmp_path):
    out, old, _, _ = grown
    scratch = tmp_path / "scratch.zarr"
    run_cache(tiny_config(scratch, source_options=GROWN, pca=str(old)))
    a, b = Store(str(out)), Store(str(scratch))
    assert a.clip_ids == b.clip_ids
    assert _clip_digests(a) == _clip_digests(b)


def test_a_changed_setting_is_refused_naming_it(grown):
    out, _, _, _ = grown
    for change, name in (({"flip": True}, "flip"), ({"compression": "zstd:9"}, "compression")):
        with pytest.raises(Re2pixError, match=f"made with other settings \\({name}: "):
            run_cache(tiny_config(out, source_options={**GROWN, "num_scenes": 5}, **change))
    assert Store(str(out)).manifest["counts"]["clips"] == 8  # nothing was appended


def test_a_killed_append_resumes_to_the_same_store(grown, ray_address, tmp_path):
    """SIGKILL an append once its first unit is recorded: the store reads as unfinished; a rerun ends it."""
    out, old, _, _ = grown
    killed = tmp_path / "killed.zarr"
    shutil.copytree(old, killed)
    args = ["--preset", "tiny", "--source-options", json.dumps(GROWN), "--unit-clips", "1", "--channel-chunk", "16"]
    args += ["--no-progress", "--out", str(killed)]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cache", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not list((killed / "progress").glob("append1-unit-*.json")):
        assert proc.poll() is None, "the job ended before its first unit was recorded"
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "progress").glob("append1-unit-*.json")))
    assert done_before < 4
    with pytest.raises(IncompleteStoreError):
        Store(str(killed))
    assert Store(str(killed), allow_incomplete=True).manifest["appending"]["generation"] == 1
    resumed = subprocess.run(
        [sys.executable, "-m", "jobs.cache", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} of 4 work units already done" in resumed.stdout
    a, b = Store(str(killed)), Store(str(out))
    assert a.clip_ids == b.clip_ids and a.manifest["generation"] == 1 and a.manifest["appending"] is None
    np.testing.assert_array_equal(a.group["frames/features"][...], b.group["frames/features"][...])
    np.testing.assert_array_equal(a.group["clips/latents"][...], b.group["clips/latents"][...])
    assert a.verify()["bad_rows"] == []
