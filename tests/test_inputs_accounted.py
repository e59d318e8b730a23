"""Own videos: every input file accounted for, input problems kept local, frames read as players show them
(issue 31 item 5; issue 30 items 3-5). The videos are real, written by PyAV here."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from jobs import cache
from jobs.cli import run
from pipeline.cache import listed_inputs
from pipeline.clips import build_clip_index
from pipeline.sources.videos import VideoFolderSource
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store
from tests.fake_datasets import write_video
from tests.store_factory import make_store

K = TINY.clip_frames  # frames a clip


def write_pattern_video(path, width, height, n=K, rate=10, rotation=None):
    """Left half red, right half blue; `rotation`: the display matrix's counter-clockwise degrees."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2 :, 2] = 255
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for _ in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_colliding_scene_names_get_distinct_ids(tmp_path):
    """`drive 1.mp4` and `drive_1.mp4` reduce to one id: both are cached, with the good video beside them
    (on the original main the index stopped with a ValueError and nothing was cached)."""
    for name in ("drive 1.mp4", "drive_1.mp4", "good.mp4"):
        write_video(tmp_path / name, n=K, rate=10)
    index = build_clip_index(VideoFolderSource(tmp_path), TINY, stride=K, progress=False)
    ids = sorted(c.clip_id for c in index.clips)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert "drive_1-000000" in ids and "good-000000" in ids  # the name that is its own id keeps it
    hashed = next(i for i in ids if i.startswith("drive_1_"))
    again = build_clip_index(VideoFolderSource(tmp_path), TINY, stride=K, progress=False)
    assert hashed in {c.clip_id for c in again.clips}  # stable across reruns
    assert index.failures == [] and index.ignored == []


def test_rotation_flag_is_applied_as_players_do(tmp_path):
    """A 32x16 video flagged 90 degrees counter-clockwise reads as 16 wide, 32 tall, its right half on top
    (on the original main it read sideways, 32 wide)."""
    write_pattern_video(tmp_path / "phone.mp4", 32, 16, rotation=90)
    src = VideoFolderSource(tmp_path)
    image = src.read_frame("phone", src.frames("phone")[0])
    assert image.shape == (32, 16, 3)
    top, bottom = image[:12].reshape(-1, 3).mean(0), image[-12:].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[0] < 60  # blue (the right half) turned up
    assert bottom[0] > 200 and bottom[2] < 60


def test_short_videos_and_other_files_are_named(tmp_path):
    """A 1-frame and a 10-frame video, a nested folder of videos and a text file: each listed by name and
    reason; a .webm is read (on the original main all of them vanished without a word)."""
    write_video(tmp_path / "one.mp4", n=1)
    write_video(tmp_path / "ten.mp4", n=K - 1)
    write_video(tmp_path / "good.mp4", n=K)
    with av.open(str(tmp_path / "web.webm"), "w") as container:  # VP9 in WebM, as browsers record
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(K):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "trip2" / "day").mkdir(parents=True)
    write_video(tmp_path / "trip2" / "day" / "deep.mp4", n=K)
    (tmp_path / "notes.txt").write_text("x")
    index = build_clip_index(VideoFolderSource(tmp_path), TINY, stride=K, progress=False)
    assert sorted({c.scene for c in index.clips}) == ["good", "web"]
    reasons = {f["file"]: f["reason"] for f in index.ignored}
    assert reasons == {
        str(tmp_path / "notes.txt"): "not a video (.mp4 .mov .mkv .avi .webm) nor in a folder of images",
        str(tmp_path / "trip2"): "a folder with no images directly in it (1 video or image further down is not read)",
        str(tmp_path / "one.mp4"): f"too short for a clip: 1 frames, a clip has {K}",
        str(tmp_path / "ten.mp4"): f"too short for a clip: {K - 1} frames, a clip has {K}",
    }

    # the store's failures list holds them, as no failed clip
    writer, index, _ = make_store(tmp_path / "s.zarr", source=VideoFolderSource(tmp_path), stride=K, finalize=False)
    writer.mark_unit_done("index", clip_rows=[], frame_rows=[], failures=listed_inputs(index))
    counts = writer.finalize()
    assert counts["failed_clips"] == 0 and counts["valid_clips"] == 2
    assert {f["file"]: f["reason"] for f in Store(str(tmp_path / "s.zarr")).failures()} == reasons


def test_cache_job_names_every_ignored_input(tmp_path, capsys):
    """The cache job's summary (a dry run: no Ray) and its stderr name each ignored file."""
    write_video(tmp_path / "good.mp4", n=K)
    write_video(tmp_path / "one.mp4", n=1)
    argv = ["--dataset", "videos", "--data-root", str(tmp_path), "--out", str(tmp_path / "s.zarr")]
    assert run(cache.main, [*argv, "--stride", str(K), "--dry-run", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["clips"] == 1
    assert summary["ignored_inputs"] == [
        {"file": str(tmp_path / "one.mp4"), "reason": f"too short for a clip: 1 frames, a clip has {K}"}
    ]
    assert f"ignored {tmp_path / 'one.mp4'}: too short for a clip" in err


def test_mixed_rates_and_other_shapes_are_warned_with_their_option(tmp_path):
    write_video(tmp_path / "a12.mp4", n=2 * K, rate=12)
    write_video(tmp_path / "b25.mp4", n=2 * K, rate=25)
    write_pattern_video(tmp_path / "portrait.mp4", 16, 32, n=2 * K, rate=25)
    src = VideoFolderSource(tmp_path)
    index = build_clip_index(src, TINY, stride=K, progress=False)
    rates, shapes = index.notes
    assert "12 fps: a12.mp4; 25 fps: b25.mp4, portrait.mp4" in rates and '"resample_fps": 12' in rates
    aspect = TINY.vae_input_hw[1] / TINY.vae_input_hw[0]
    assert "portrait.mp4 16x32" in shapes and "a12.mp4" not in shapes
    assert f'"crop_aspect": {aspect:.4g}' in shapes

    # the options they name: one clock for every video, frames cropped to the clips' shape
    src = VideoFolderSource(tmp_path, resample_fps=12, crop_aspect=aspect)
    index = build_clip_index(src, TINY, stride=K, progress=False)
    assert index.notes == []
    b25 = src.frames("b25")
    assert [f.timestamp for f in b25[:4]] == pytest.approx([0, 1 / 12, 2 / 12, 3 / 12])
    assert len(b25) == int((2 * K - 1) / 25 * 12) + 1  # the video's span at 12 fps
    assert [f.path.rsplit("#", 1)[1] for f in b25[:4]] == ["0", "2", "4", "6"]  # nearest frames at 25 fps
    image = src.read_frame("portrait", src.frames("portrait")[0])
    assert image.shape[1] == 16 and image.shape[1] / image.shape[0] == pytest.approx(aspect, rel=0.1)
