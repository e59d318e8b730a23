"""The nuScenes, Cityscapes, KITTI and CoVLA adapters on tiny fake trees in their real layouts."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest

from pipeline.clips import build_clip_index
from pipeline.sources import SourceError, get_source
from pipeline.sources.cityscapes import CityscapesSource
from pipeline.sources.covla import CovlaSource
from pipeline.sources.kitti import KittiSource, parse_timestamp
from pipeline.sources.nuscenes import NuScenesSource
from pipeline.store.geometry import Geometry
from tests.fake_datasets import frame_image, frame_level, make_cityscapes, make_covla, make_kitti, make_nuscenes

G5 = Geometry(clip_frames=5, context_frames=1)  # feature frames 0 and 4
GAP = "time gap > 1.5 frame intervals"


@pytest.fixture(autouse=True)
def no_devkit(monkeypatch):
    """The nuScenes devkit is absent unless a test installs a fake one."""
    monkeypatch.setitem(sys.modules, "nuscenes", None)


# ---------------------------------------------------------------- nuScenes


def test_nuscenes_cam_front_keyframes_and_sweeps_in_time_order(tmp_path):
    fake = make_nuscenes(tmp_path, scenes=2, frames_per_scene=14)
    src = get_source("nuscenes", tmp_path, split="all")
    assert isinstance(src, NuScenesSource) and src.version == "v1.0-trainval" and src.fps == 12
    assert src.scenes() == ["scene-0001", "scene-0002"]
    for s, name in enumerate(src.scenes()):
        frames = src.frames(name)
        # only CAM_FRONT (the tables also hold CAM_BACK and LIDAR_TOP), samples and sweeps interleaved
        assert [f.path for f in frames] == fake["scenes"][name]
        assert [f.index for f in frames] == list(range(14))
        assert np.allclose([f.timestamp for f in frames], fake["timestamps"][name])
        kinds = [f.path.split(os.sep)[-3] for f in frames]
        assert kinds[:7] == ["samples", "sweeps", "sweeps", "sweeps", "sweeps", "sweeps", "samples"]
        img = src.read_frame(name, frames[5])
        assert img.dtype == np.uint8 and img.shape == (48, 80, 3)  # read from the file
        assert abs(img.mean() - frame_level(s, 5)) < 2
    idx = build_clip_index(src, G5, progress=False)
    assert len(idx) == 2 * 10 and idx.skipped == {}  # ±1 ms jitter is no gap


def test_nuscenes_gap_skips_windows_spanning_it(tmp_path):
    make_nuscenes(tmp_path, scenes=2, frames_per_scene=16, drop={0: [7]})
    src = NuScenesSource(tmp_path, split="all")
    assert len(src.frames("scene-0001")) == 15
    idx = build_clip_index(src, G5, progress=False)
    # scene 1: 11 windows, the gap between positions 6 and 7 kills starts 3..6; scene 2: 12 windows
    starts = [c.start for c in idx.clips if c.scene == "scene-0001"]
    assert starts == [0, 1, 2, 7, 8, 9, 10]
    assert len(idx) == 7 + 12 and idx.skipped == {GAP: 4}
    for c in idx.clips:
        assert max(np.diff(c.timestamps)) <= 1.5 / 12


def test_nuscenes_version_choice(tmp_path):
    make_nuscenes(tmp_path / "a", scenes=1, frames_per_scene=3, version="v1.0-mini")
    assert NuScenesSource(tmp_path / "a", split="all").version == "v1.0-mini"
    make_nuscenes(tmp_path / "a", scenes=2, frames_per_scene=3, version="v1.0-trainval")
    assert NuScenesSource(tmp_path / "a", split="all").version == "v1.0-trainval"  # preferred
    assert NuScenesSource(tmp_path / "a", split="all", version="v1.0-mini").scenes() == ["scene-0001"]
    with pytest.raises(SourceError, match="v1.0-trainval or v1.0-mini"):
        NuScenesSource(tmp_path / "empty", split="all")


def test_nuscenes_splits(tmp_path):
    fake = make_nuscenes(tmp_path, scenes=3, frames_per_scene=3)
    assert NuScenesSource(tmp_path, split_file=fake["split_file"]).scenes() == ["scene-0001", "scene-0002"]
    assert NuScenesSource(tmp_path, "val", split_file=fake["split_file"]).scenes() == ["scene-0003"]
    txt = tmp_path / "val.txt"
    txt.write_text("# my val\nscene-0002\n\nscene-0009\n")
    src = NuScenesSource(tmp_path, "val", split_file=txt)
    assert src.scenes() == ["scene-0002"] and src.missing_scenes == 1
    with pytest.raises(SourceError, match="split.json.*'test'"):
        NuScenesSource(tmp_path, "test", split_file=fake["split_file"])
    with pytest.raises(SourceError, match="split_file=PATH"):  # no split file, no devkit: never invent one
        NuScenesSource(tmp_path, "train")


def test_nuscenes_devkit_split_lists(tmp_path, monkeypatch):
    make_nuscenes(tmp_path, scenes=3, frames_per_scene=3, version="v1.0-mini")
    splits = types.ModuleType("nuscenes.utils.splits")
    splits.train, splits.val = ["scene-0001"], ["scene-0002"]
    splits.mini_train, splits.mini_val = ["scene-0001", "scene-0003"], ["scene-0002"]
    pkg, utils = types.ModuleType("nuscenes"), types.ModuleType("nuscenes.utils")
    pkg.utils, utils.splits = utils, splits
    monkeypatch.setitem(sys.modules, "nuscenes", pkg)
    monkeypatch.setitem(sys.modules, "nuscenes.utils", utils)
    monkeypatch.setitem(sys.modules, "nuscenes.utils.splits", splits)
    src = NuScenesSource(tmp_path, "train")  # v1.0-mini: train means mini_train
    assert src.scenes() == ["scene-0001", "scene-0003"] and "mini_train" in src.describe()["split_source"]


def test_nuscenes_malformed_tables_and_missing_images(tmp_path):
    fake = make_nuscenes(tmp_path, scenes=1, frames_per_scene=4)
    table = tmp_path / "v1.0-trainval" / "sample_data.json"
    rows = json.loads(table.read_text())
    src = NuScenesSource(tmp_path, split="all")
    frames = src.frames("scene-0001")
    os.remove(fake["scenes"]["scene-0001"][2])
    with pytest.raises(SourceError, match=r"__CAM_FRONT__.*\.jpg: image file not found"):
        src.read_frame("scene-0001", frames[2])
    with open(fake["scenes"]["scene-0001"][1], "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(SourceError, match="cannot read image"):
        src.read_frame("scene-0001", frames[1])

    table.write_text("{not json")
    with pytest.raises(SourceError, match="sample_data.json: cannot read JSON"):
        NuScenesSource(tmp_path, split="all").frames("scene-0001")
    del rows[0]["timestamp"]
    table.write_text(json.dumps(rows))
    with pytest.raises(SourceError, match="sample_data.json: a record lacks field 'timestamp'"):
        NuScenesSource(tmp_path, split="all").frames("scene-0001")
    (tmp_path / "v1.0-trainval" / "scene.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(SourceError, match="scene.json: expected a JSON list"):
        NuScenesSource(tmp_path, split="all")


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_snippets_split_on_numbering_breaks(tmp_path):
    make_cityscapes(tmp_path, "train", [("aachen", 0, 0, 10), ("aachen", 0, 40, 7), ("bochum", 3, 5, 6)])
    src = get_source("cityscapes", tmp_path, split="train")
    assert isinstance(src, CityscapesSource) and src.fps == 17 and not src.eval_clip
    assert src.scenes() == ["aachen_000000_000000", "aachen_000000_000040", "bochum_000003_000005"]
    second = src.frames("aachen_000000_000040")
    assert [os.path.basename(f.path) for f in second[:2]] == [
        "aachen_000000_000040_leftImg8bit.png",
        "aachen_000000_000041_leftImg8bit.png",
    ]
    assert [f.index for f in second] == list(range(7))
    assert np.allclose(np.diff([f.timestamp for f in second]), 1 / 17)
    assert np.array_equal(src.read_frame("aachen_000000_000040", second[3]), frame_image(1, 3))
    idx = build_clip_index(src, G5, progress=False)  # sliding windows for train
    assert len(idx) == 6 + 3 + 2 and idx.skipped == {}


def test_cityscapes_val_evaluation_window(tmp_path):
    make_cityscapes(tmp_path, "val", [("frankfurt", 0, 275, 30), ("frankfurt", 0, 557, 30), ("lindau", 1, 0, 20)])
    src = CityscapesSource(tmp_path, "val")
    assert src.eval_clip
    idx = build_clip_index(src, Geometry(), progress=False)
    assert [(c.scene, c.start) for c in idx.clips] == [("frankfurt_000000_000275", 3), ("frankfurt_000000_000557", 3)]
    clip = idx.clips[0]
    names = [os.path.basename(f.path)[: -len("_leftImg8bit.png")] for f in clip.frames]
    assert names[0] == "frankfurt_000000_000278" and names[-1] == "frankfurt_000000_000302"  # snippet 3..27
    assert names[16] == "frankfurt_000000_000294"  # annotated snippet frame 19 = clip frame 16
    assert [clip.frames[o].index for o in Geometry().feature_frame_offsets] == [3, 7, 11, 15, 19, 23, 27]
    assert idx.skipped == {"not the evaluation window (snippet frames 3-27)": 2 * 5}  # lindau: no 25-window at all
    starts, reasons = src.clip_windows("lindau_000001_000000", src.frames("lindau_000001_000000"), 25, 1)
    assert starts == [] and reasons == {}  # shorter than one window: nothing to skip
    make_cityscapes(tmp_path / "s", "val", [("munster", 2, 0, 26)])  # a 25-window exists, but not 3..27
    idx = build_clip_index(CityscapesSource(tmp_path / "s", "val"), Geometry(), progress=False)
    assert len(idx) == 0 and idx.skipped == {"snippet shorter than 28 frames": 2}
    with pytest.raises(ValueError, match="eval_clip=False"):
        build_clip_index(src, G5, progress=False)
    assert len(build_clip_index(CityscapesSource(tmp_path, "val", eval_clip=False), G5, progress=False)) == 26 * 2 + 16


def test_cityscapes_bad_names_and_missing_split(tmp_path):
    make_cityscapes(tmp_path, "train", [("ulm", 0, 0, 3)])
    with pytest.raises(SourceError, match="leftImg8bit_sequence.*val"):
        CityscapesSource(tmp_path, "val")
    (tmp_path / "leftImg8bit_sequence" / "train" / "ulm" / "ulm_0_1.png").write_bytes(b"")
    with pytest.raises(SourceError, match="ulm_0_1.png: not named"):
        CityscapesSource(tmp_path, "train")


# ---------------------------------------------------------------- KITTI


def test_kitti_drives_and_timestamps(tmp_path):
    fake = make_kitti(tmp_path)
    src = get_source("kitti", tmp_path, split="val")
    assert isinstance(src, KittiSource) and src.fps == 10
    assert src.scenes() == ["2011_09_26_drive_0001_sync", "2011_09_26_drive_0005_sync"]
    for name, stamps in fake.items():
        frames = src.frames(name)
        assert [os.path.basename(f.path) for f in frames] == [f"{i:010d}.png" for i in range(len(stamps))]
        assert np.allclose([f.timestamp for f in frames], stamps, atol=1e-6, rtol=0)
    assert parse_timestamp("2011-09-26 13:02:25.964389445") == pytest.approx(1317042145.964389445, abs=1e-6)
    assert np.array_equal(
        src.read_frame("2011_09_26_drive_0005_sync", src.frames("2011_09_26_drive_0005_sync")[2]), frame_image(1, 2)
    )
    assert KittiSource(tmp_path, "test").scenes() == KittiSource(tmp_path, "all").scenes() == src.scenes()
    assert len(build_clip_index(src, G5, progress=False)) == 4 + 2


def test_kitti_train_and_timestamp_errors(tmp_path):
    make_kitti(tmp_path, drives=(("2011_09_26", 1, 4),))
    with pytest.raises(SourceError, match="evaluation only"):
        KittiSource(tmp_path, "train")
    assert len(KittiSource(tmp_path, "train", allow_train=True).scenes()) == 1
    cam = tmp_path / "2011_09_26" / "2011_09_26_drive_0001_sync" / "image_02"
    ts = cam / "timestamps.txt"
    lines = ts.read_text().splitlines()
    ts.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(SourceError, match="timestamps.txt: 3 timestamps for 4 images"):
        KittiSource(tmp_path, "val").frames("2011_09_26_drive_0001_sync")
    ts.write_text("\n".join(lines[:3] + ["yesterday"]) + "\n")
    with pytest.raises(SourceError, match="timestamps.txt"):
        KittiSource(tmp_path, "val").frames("2011_09_26_drive_0001_sync")
    ts.write_text("\n".join(lines) + "\n")
    src = KittiSource(tmp_path, "val")
    frame = src.frames("2011_09_26_drive_0001_sync")[1]
    os.remove(frame.path)
    with pytest.raises(SourceError, match="0000000001.png: image file not found"):
        src.read_frame("2011_09_26_drive_0001_sync", frame)


# ---------------------------------------------------------------- CoVLA

VID, IMG = "2022-07-14--14-27-53--10_first", "2022-07-15--09-11-02--20_first"


def test_covla_video_and_image_layouts(tmp_path):
    make_covla(tmp_path, videos=((VID, 12),), images=((IMG, 6),))
    src = get_source("covla", tmp_path, split="all", cache_frames=2)
    assert isinstance(src, CovlaSource) and src.fps == 20 and src.scenes() == [VID, IMG]
    frames = src.frames(VID)
    assert len(frames) == 12 and frames[3].path.endswith(f"{VID}.mp4#3")
    assert np.allclose([f.timestamp for f in frames], np.arange(12) / 20)  # from pts (B-frames reorder packets)
    # forward, backward (seek to the keyframe before), and cached reads all give the right picture
    for i in [0, 1, 2, 10, 11, 9, 3, 7, 7, 0, 5]:
        img = src.read_frame(VID, frames[i])
        assert img.shape == (48, 80, 3) and img.dtype == np.uint8
        assert abs(img.mean() - frame_level(0, i)) < 3, i
    img[:] = 0
    assert abs(src.read_frame(VID, frames[5]).mean() - frame_level(0, 5)) < 3  # the cache was not written into
    clone = pickle.loads(pickle.dumps(src))
    assert abs(clone.read_frame(VID, frames[8]).mean() - frame_level(0, 8)) < 3
    im_frames = src.frames(IMG)
    assert np.allclose([f.timestamp for f in im_frames], np.arange(6) / 20)
    assert np.array_equal(src.read_frame(IMG, im_frames[4]), frame_image(1, 4))
    assert len(build_clip_index(src, G5, progress=False)) == 8 + 2


def test_covla_splits_and_errors(tmp_path):
    make_covla(tmp_path, videos=((VID, 6),), images=((IMG, 6),))
    with pytest.raises(SourceError, match="split_file=PATH"):
        CovlaSource(tmp_path, "train")
    (tmp_path / "split.json").write_text(json.dumps({"train": [IMG], "val": [VID]}))
    assert CovlaSource(tmp_path, "train", split_file=tmp_path / "split.json").scenes() == [IMG]
    (tmp_path / "val.txt").write_text(f"{VID}\n")
    assert CovlaSource(tmp_path, "val", split_file=tmp_path / "val.txt").scenes() == [VID]
    with pytest.raises(SourceError, match="nope.txt: cannot read split file"):
        CovlaSource(tmp_path, "val", split_file=tmp_path / "nope.txt")
    src = CovlaSource(tmp_path, "all")
    frame = src.frames(IMG)[2]
    os.remove(frame.path)
    with pytest.raises(SourceError, match="0002.png: image file not found"):
        src.read_frame(IMG, frame)
    (tmp_path / "videos" / f"{VID}.mp4").write_bytes(b"garbage")
    with pytest.raises(SourceError, match=f"{VID}.mp4: cannot read the video"):
        CovlaSource(tmp_path, "all").frames(VID)
