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

from pipeline.cache import CacheConfig, run_cache
from pipeline.clips import build_clip_index
from pipeline.frames import hflip, resize_frames
from pipeline.sources import get_source
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store

SYNTH = {"num_scenes": 2, "frames_per_scene": 29, "height": 72, "width": 128}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **kw):
    base = {
        "dataset": "synthetic",
        "source_options": SYNTH,
        "out": str(out),
        "geometry": "tiny",
        "encoder": "tiny",
        "vae": "tiny",
        "pca_frames": 64,
        "stride": 4,
        "unit_clips": 1,
        "channel_chunk": 16,
        "progress": False,
        "vae_threads": 1,
    }  # the tiny preset's setting: its small tensors run slower on 2 threads
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
    summary = run_cache(
        tiny_config(out, dataset="videos", data_root=str(tmp_path / "videos"), source_options={}, pca=str(cached[0]))
    )
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
    run_cache(
        tiny_config(
            out, flip=True, source_options={**SYNTH, "num_scenes": 1, "frames_per_scene": 25}, pca=str(cached[0])
        )
    )
    store = Store(str(out))
    assert store.variants == ["orig", "hflip"] and len(store) == 1
    source = get_source("synthetic", None, "train", **{**SYNTH, "num_scenes": 1, "frames_per_scene": 25})
    frame = source.read_frame("scene-0000", source.frames("scene-0000")[0])[None]
    dino = load_dinov2("tiny", input_hw=TINY.dino_input_hw, device="cpu")
    flipped = store.basis.project(dino(hflip(resize_frames(frame, TINY.dino_input_hw))).numpy())
    np.testing.assert_allclose(
        store.read_features(0, variant=1)[0].astype(np.float32), flipped[0], rtol=2e-3, atol=2e-3
    )
    assert not np.allclose(store.read_latents(0, variant=0), store.read_latents(0, variant=1))


def test_killed_job_resumes_to_the_same_store(cached, ray_address, tmp_path):
    """SIGKILL a job (4 clips, one per unit) once its first unit is recorded, rerun it, and compare
    with the uninterrupted run of the same configuration (the module's store)."""
    args = [
        "--preset",
        "tiny",
        "--source-options",
        json.dumps(SYNTH),
        "--pca",
        str(cached[0]),
        "--unit-clips",
        "1",
        "--channel-chunk",
        "16",
        "--no-progress",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cache", *args, "--out", str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not list((killed / "progress").glob("unit-*.json")):
        assert proc.poll() is None, "the job ended before its first unit was recorded"
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "progress").glob("unit-*.json")))
    assert done_before < 4 and not Store(str(killed), allow_incomplete=True).manifest["complete"]
    resumed = subprocess.run(
        [sys.executable, "-m", "jobs.cache", *args, "--out", str(killed)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} of 4 work units already done" in resumed.stdout
    a, b = Store(str(killed)), Store(str(cached[0]))
    assert a.clip_ids == b.clip_ids and len(a) == 4
    np.testing.assert_array_equal(a.group["frames/features"][...], b.group["frames/features"][...])
    np.testing.assert_array_equal(a.group["clips/latents"][...], b.group["clips/latents"][...])
    assert a.verify()["bad_rows"] == []


def test_make_cache_of_a_nuscenes_tree_names_dataset_split_and_rate(cached, ray_address, tmp_path):
    from tests.fake_datasets import make_nuscenes

    tree = make_nuscenes(tmp_path / "nuscenes", scenes=3, frames_per_scene=26)
    store = tmp_path / "nuscenes.zarr"
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    run = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "cache",
            "DATASET=nuscenes",
            f"DATA_ROOT={tmp_path / 'nuscenes'}",
            "SPLIT=train",
            f"SPLIT_FILE={tree['split_file']}",
            f"STORE={store}",
            f"ARGS=--pca {cached[0]} --no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    m = Store(str(store)).manifest
    assert (m["dataset"], m["split"], m["fps"]) == ("nuscenes", "train", 12.0)
    assert len(Store(str(store))) == 2  # train = every scene but the last: one 25-frame window each


# ---- bad inputs, cheap checks, one line per user error ---------------------------------------------
def _job(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.mark.parametrize("job", ["jobs.cache", "jobs.pca"])
def test_help_prints_every_option(job):
    run = _job(job, "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--storage-options" in run.stdout and "--device" in run.stdout


def test_an_unknown_dataset_or_a_file_as_data_root_is_one_line(tmp_path):
    run = _job("jobs.cache", "--dataset", "nope", "--out", str(tmp_path / "s.zarr"))
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        "error: unknown dataset 'nope'; known: cityscapes, covla, kitti, nuscenes, synthetic, videos"
    ]
    (tmp_path / "file.txt").write_text("not a folder")
    run = _job(
        "jobs.cache",
        "--dataset",
        "videos",
        "--data-root",
        str(tmp_path / "file.txt"),
        "--out",
        str(tmp_path / "s.zarr"),
    )
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"error: videos: data root {tmp_path / 'file.txt'} is a file, not a folder"
    ]


def test_an_unreadable_video_is_recorded_and_the_good_ones_are_cached(cached, tmp_path):
    from tests.fake_datasets import write_video

    root = tmp_path / "videos"
    root.mkdir()
    write_video(root / "good.mp4", n=30)
    (root / "empty.mp4").write_bytes(b"")
    summary = run_cache(
        tiny_config(
            tmp_path / "store.zarr", dataset="videos", data_root=str(root), source_options={}, pca=str(cached[0])
        )
    )
    store = Store(str(tmp_path / "store.zarr"))
    assert store.clip_ids == ["good-000000", "good-000004"]
    [failure] = store.failures()
    assert failure["file"].endswith("empty.mp4") and failure["reason"]
    assert summary["failed_clips"] == 1 and summary["unreadable_inputs"] == 1


def test_frames_of_different_sizes_in_one_scene_are_resized_one_by_one(ray_address, tmp_path):
    rng = np.random.default_rng(1)
    scene = tmp_path / "videos" / "mixed"
    scene.mkdir(parents=True)
    for i in range(25):
        hw = (48, 80) if i % 2 else (60, 100)
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(scene / f"{i:04d}.png")
    summary = run_cache(
        tiny_config(
            tmp_path / "store.zarr",
            dataset="videos",
            data_root=str(tmp_path / "videos"),
            source_options={},
            pca_frames=16,
        )
    )  # the PCA pass sees both sizes
    assert summary["valid_clips"] == 1 and summary["failed_clips"] == 0


def test_a_finished_store_is_already_complete_and_other_settings_are_refused(cached):
    from pipeline.errors import Re2pixError

    summary = run_cache(tiny_config(cached[0]))
    assert summary["already_complete"] and summary["valid_clips"] == 4
    with pytest.raises(Re2pixError, match="already a finished store made with other settings"):
        run_cache(tiny_config(cached[0], stride=2))


def test_cheap_checks_fail_before_any_encoder_runs(tmp_path):
    from pipeline.errors import Re2pixError

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(Re2pixError, match="is a file, not a folder"):
        run_cache(tiny_config(tmp_path / "file.txt" / "store.zarr"))
    huge = {"num_scenes": 1, "frames_per_scene": 400000, "height": 8, "width": 8}  # ~0.5 TB
    with pytest.raises(Re2pixError, match="GiB free"):
        run_cache(tiny_config(tmp_path / "huge.zarr", geometry="paper", source_options=huge))
    assert not (tmp_path / "huge.zarr").exists()


def test_dry_run_estimates_without_writing(tmp_path):
    summary = run_cache(tiny_config(tmp_path / "dry.zarr", dry_run=True, vae_threads=1))
    assert (summary["clips"], summary["frames"], summary["work_units"]) == (4, 16, 4)
    assert summary["store_bytes"]["uncompressed"] == 16 * 8 * 14 * 64 * 2 + 4 * 16 * 7 * 12 * 20 * 2
    assert summary["encoder_s_per_clip_on_this_cpu"] > 0
    assert not (tmp_path / "dry.zarr").exists()


def test_actors_declare_memory_from_the_encoders_and_the_flags_override_it():
    from pipeline.cache import actor_memory, plan_resources, unit_bytes
    from pipeline.ray_cluster import RayCluster
    from pipeline.store.geometry import GEOMETRIES

    tiny, paper = GEOMETRIES["tiny"], GEOMETRIES["paper"]
    footprint = {"worker": 300 * 2**20, "encoders": 400 * 2**20}
    gpus, cpus = RayCluster("x", "given", 16, 4, 1), RayCluster("x", "given", 2, 0, 1)

    def declared(cfg, cluster, geometry=tiny):
        device = "cuda" if cluster.gpus else "cpu"
        memory = actor_memory(footprint, geometry, unit_bytes(geometry, 8, 4, 1), device, 16, 1)
        res = plan_resources(cfg, cluster, 10, memory)[0]
        return res.actor_kwargs()["memory"], res.task_kwargs("decode")["memory"], res.task_kwargs("write")["memory"]

    enc, dec, wr = declared(CacheConfig(), cpus)
    assert enc > footprint["encoders"] and dec > footprint["worker"] and wr > footprint["worker"]
    # activations on a CPU device grow with the geometry; on a GPU they are not host memory
    assert declared(CacheConfig(), cpus, paper)[0] > 5 * declared(CacheConfig(), gpus, paper)[0]
    assert declared(CacheConfig(), gpus, paper)[1] > dec  # a paper-size unit's frames
    enc, dec, wr = declared(CacheConfig(encoder_memory_gb=3, task_memory_gb=0.5), cpus)
    assert (enc, dec, wr) == (3 * 2**30, 2**29, 2**29)


def test_out_defaults_to_the_demo_store_of_every_job():
    """pipeline/ does not import jobs/: the cache config keeps its own copy of the demo store's path."""
    from jobs.config import DEMO_STORE

    assert CacheConfig().out == DEMO_STORE
