"""The cache job end to end on tiny encoders and generated data, on the session's Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cache import CacheConfig, run_cache
from pipeline.clips import build_clip_index
from pipeline.frames import hflip, resize_frames
from pipeline.sources import get_source
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store

SYNTH = {"num_scenes": 2, "frames_per_scene": 29, "height": 72, "width": 128}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **kw):
    base = {"dataset": "synthetic", "source_options": SYNTH, "out": str(out), "geometry": "tiny", "encoder": "tiny",
                "vae": "tiny", "pca_frames": 64, "stride": 4, "unit_clips": 1, "channel_chunk": 16, "progress": False}
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def cached(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "store.zarr"
    summary = run_cache(tiny_config(out))
    return out, summary


def test_store_holds_every_clip_with_the_right_shapes(cached):
    out, summary = cached
    store = Store(str(out))
    # 2 scenes x 29 frames, windows of 25 every 4 frames -> starts 0 and 4 in each scene
    assert len(store) == 4 and summary["failed_clips"] == 0
    assert store.clip_ids == ["scene-0000-000000", "scene-0000-000004", "scene-0001-000000", "scene-0001-000004"]
    clip = store.read_clip(3)
    assert clip.features.shape == TINY.features_shape and clip.latents.shape == TINY.latents_shape
    assert np.isfinite(clip.features).all() and np.isfinite(clip.latents).all()
    assert store.manifest["dataset"] == "synthetic" and store.manifest["encoders"]["dinov2"]["sha256"]
    assert store.verify()["bad_rows"] == []


def test_overlapping_clips_do_not_store_a_frame_twice(cached):
    store = Store(str(cached[0]))
    # feature frames 0, 4, ..., 28 of each scene: 8 per scene, not 7 per clip x 4 clips
    assert store.group["frames/features"].shape[0] == 16


def test_features_and_latents_equal_a_direct_computation(cached):
    from pipeline.encoders import load_dinov2, load_vae
    store = Store(str(cached[0]))
    source = get_source("synthetic", None, "train", **SYNTH)
    index = build_clip_index(source, TINY, stride=4, progress=False)
    clip = index.clips[1]
    frames = np.stack([source.read_frame(clip.scene, f) for f in clip.frames])
    dino = load_dinov2("tiny", input_hw=TINY.dino_input_hw, device="cpu")
    raw = dino(resize_frames(frames[list(TINY.feature_frame_offsets)], TINY.dino_input_hw)).numpy()
    expected = store.basis.project(raw).astype(np.float16)
    got = store.read_features(1).astype(np.float32)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2e-3, atol=2e-3)
    vae = load_vae("tiny", input_hw=TINY.vae_input_hw, device="cpu")
    z = vae(resize_frames(frames, TINY.vae_input_hw)[None]).numpy()[0].astype(np.float16)
    np.testing.assert_allclose(store.read_latents(1).astype(np.float32), z.astype(np.float32), rtol=2e-3, atol=2e-3)


def _write_image_scenes(root: Path, scenes=2, frames=29, corrupt=None):
    rng = np.random.default_rng(0)
    for s in range(scenes):
        d = root / f"drive{s}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
        for i in range(frames):
            path = d / f"{i:04d}.png"
            if (s, i) == corrupt:
                path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            else:
                Image.fromarray(np.roll(base, 2 * i, axis=1)).save(path)


def test_a_corrupt_frame_is_recorded_and_the_rest_is_complete(cached, tmp_path):
    _write_image_scenes(tmp_path / "videos", corrupt=(1, 26))  # frame 26 of drive1: only its 2nd clip
    out = tmp_path / "store.zarr"
    summary = run_cache(tiny_config(out, dataset="videos", data_root=str(tmp_path / "videos"), source_options={},
                                    pca=str(cached[0])))
    store = Store(str(out))
    assert summary["failed_clips"] == 1 and len(store) == 3
    [failure] = store.failures()
    assert failure["clip_id"] == "drive1-000004" and failure["file"].endswith("drive1/0026.png")
    assert failure["reason"]
    assert "drive1-000004" not in store.clip_ids and "drive1-000000" in store.clip_ids
    assert np.isfinite(store.read_features(2)).all()


def test_flip_variants_are_the_encodings_of_flipped_frames(cached, tmp_path):
    from pipeline.encoders import load_dinov2
    out = tmp_path / "store.zarr"
    run_cache(tiny_config(out, flip=True, source_options={**SYNTH, "num_scenes": 1, "frames_per_scene": 25},
                          pca=str(cached[0])))
    store = Store(str(out))
    assert store.variants == ["orig", "hflip"] and len(store) == 1
    source = get_source("synthetic", None, "train", **{**SYNTH, "num_scenes": 1, "frames_per_scene": 25})
    frame = source.read_frame("scene-0000", source.frames("scene-0000")[0])[None]
    dino = load_dinov2("tiny", input_hw=TINY.dino_input_hw, device="cpu")
    flipped = store.basis.project(dino(hflip(resize_frames(frame, TINY.dino_input_hw))).numpy())
    np.testing.assert_allclose(store.read_features(0, variant=1)[0].astype(np.float32), flipped[0], rtol=2e-3,
                               atol=2e-3)
    assert not np.allclose(store.read_latents(0, variant=0), store.read_latents(0, variant=1))


def test_killed_job_resumes_to_the_same_store(cached, ray_address, tmp_path):
    """SIGKILL a job (4 clips, one per unit) once its first unit is recorded, rerun it, and compare
    with the uninterrupted run of the same configuration (the module's store)."""
    args = ["--preset", "tiny", "--source-options", json.dumps(SYNTH), "--pca", str(cached[0]), "--unit-clips", "1",
            "--channel-chunk", "16", "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cache", *args, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not list((killed / "progress").glob("unit-*.json")):
        assert proc.poll() is None, "the job ended before its first unit was recorded"
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "progress").glob("unit-*.json")))
    assert done_before < 4 and not Store(str(killed), allow_incomplete=True).manifest["complete"]
    resumed = subprocess.run([sys.executable, "-m", "jobs.cache", *args, "--out", str(killed)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} of 4 work units already done" in resumed.stdout
    a, b = Store(str(killed)), Store(str(cached[0]))
    assert a.clip_ids == b.clip_ids and len(a) == 4
    np.testing.assert_array_equal(a.group["frames/features"][...], b.group["frames/features"][...])
    np.testing.assert_array_equal(a.group["clips/latents"][...], b.group["clips/latents"][...])
    assert a.verify()["bad_rows"] == []


def test_make_cache_of_a_nuscenes_tree_names_dataset_split_and_rate(cached, ray_address, tmp_path):
    from fake_datasets import make_nuscenes
    tree = make_nuscenes(tmp_path / "nuscenes", scenes=3, frames_per_scene=26)
    store = tmp_path / "nuscenes.zarr"
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    run = subprocess.run(["make", "--no-print-directory", "cache", "DATASET=nuscenes",
                          f"DATA_ROOT={tmp_path / 'nuscenes'}",
                          "SPLIT=train", f"SPLIT_FILE={tree['split_file']}", f"STORE={store}",
                          f"ARGS=--pca {cached[0]} --no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    m = Store(str(store)).manifest
    assert (m["dataset"], m["split"], m["fps"]) == ("nuscenes", "train", 12.0)
    assert len(Store(str(store))) == 2  # train = every scene but the last: one 25-frame window each
