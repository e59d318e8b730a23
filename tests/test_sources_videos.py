import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import SourceError, get_source
from pipeline.sources import videos as videos_module
from pipeline.sources.videos import VideoFolderSource
from tests.fake_datasets import colour, write_video


def write_images(folder, names, offset=0):
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.broadcast_to(colour(i + offset), (40, 60, 3)).copy()).save(folder / name)


def assert_colour(image, i, tol=8):
    mean = image.reshape(-1, 3).mean(0)
    assert np.abs(mean - colour(i)).max() < tol, (mean, colour(i))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "drive_b.mp4")
    write_video(root / "drive_a.mkv", n=12, rate=10, codec="mpeg4", offset=40)
    write_images(root / "cam", ["f10.png", "f2.png", "f1.jpg", "f3.png"])
    (root / "notes.txt").write_text("not a scene")
    (root / "empty").mkdir()
    return root


def test_scene_listing_and_timestamps(root):
    src = get_source("videos", str(root))
    assert src.scenes() == ["cam", "drive_a", "drive_b"]
    assert src.fps == 10.0  # the first video's own rate (drive_a.mkv)
    mp4 = src.frames("drive_b")
    assert [f.index for f in mp4] == list(range(30))
    assert [f.timestamp for f in mp4] == pytest.approx([i / 15 for i in range(30)])
    assert mp4[7].path == f"{root / 'drive_b.mp4'}#7"
    assert len(src.frames("drive_a")) == 12
    images = src.frames("cam")
    assert [f.path.rsplit("/", 1)[1] for f in images] == ["f1.jpg", "f2.png", "f3.png", "f10.png"]
    assert [f.timestamp for f in images] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert src.describe()["source_root"] == str(root)


def test_fps_argument(root):
    src = VideoFolderSource(root, fps=5)
    assert src.fps == 5.0
    assert [f.timestamp for f in src.frames("cam")] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert src.frames("drive_b")[15].timestamp == pytest.approx(1.0)  # videos keep their own clock


def test_frames_decode_in_order_with_right_content(root):
    src = VideoFolderSource(root)
    for i, frame in enumerate(src.frames("drive_b")):
        image = src.read_frame("drive_b", frame)
        assert image.shape == (64, 96, 3) and image.dtype == np.uint8
        assert_colour(image, i)
    for i, frame in enumerate(src.frames("drive_a")):
        assert_colour(src.read_frame("drive_a", frame), i + 40)
    written = {"f2.png": 1, "f10.png": 0, "f1.jpg": 2, "f3.png": 3}  # write order of write_images
    for frame in src.frames("cam"):
        image = src.read_frame("cam", frame)
        assert image.shape == (40, 60, 3)
        assert_colour(image, written[frame.path.rsplit("/", 1)[1]], tol=4)


def test_random_access_across_videos(root, monkeypatch):
    monkeypatch.setattr(videos_module, "SEEK_AHEAD", 4)  # exercise forward seeks too
    src = VideoFolderSource(root, buffer_frames=3)
    b, a = src.frames("drive_b"), src.frames("drive_a")
    for scene, refs, i, offset in [
        ("drive_b", b, 20, 0),
        ("drive_b", b, 3, 0),
        ("drive_a", a, 11, 40),
        ("drive_b", b, 29, 0),
        ("drive_a", a, 0, 40),
        ("drive_b", b, 0, 0),
        ("drive_b", b, 12, 0),
        ("drive_b", b, 11, 0),
    ]:
        assert_colour(src.read_frame(scene, refs[i]), i + offset)
    clone = pickle.loads(pickle.dumps(src))  # ships to workers without open decoders
    assert_colour(clone.read_frame("drive_b", b[5]), 5)


def test_split_folder(tmp_path):
    write_images(tmp_path / "train" / "s1", ["0.png", "1.png"])
    write_images(tmp_path / "val" / "s2", ["0.png"])
    assert VideoFolderSource(tmp_path, split="train").scenes() == ["s1"]
    assert VideoFolderSource(tmp_path, split="val").scenes() == ["s2"]
    assert VideoFolderSource(tmp_path, split="test").scenes() == []  # no test/: root itself, no scenes


def test_corrupt_inputs_raise_source_error(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good)
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.mov").write_bytes(b"\x00not a video at all" * 50)
    write_images(tmp_path / "frames", ["0.png", "1.png"])
    (tmp_path / "frames" / "1.png").write_bytes(b"broken png")
    src = VideoFolderSource(tmp_path)
    assert src.fps == 15.0  # unreadable videos are skipped when probing the rate
    for scene, name in (("truncated", "truncated.mp4"), ("garbage", "garbage.mov")):
        with pytest.raises(SourceError, match=name):
            src.frames(scene)
    frames = src.frames("frames")
    assert_colour(src.read_frame("frames", frames[0]), 0, tol=2)
    with pytest.raises(SourceError, match="1.png"):
        src.read_frame("frames", frames[1])
    with pytest.raises(SourceError, match="out of range"):
        src.read_frame("good", frames[1].__class__(99, 0.0, "good.mp4#99"))
    with pytest.raises(SourceError, match="nope"):
        src.frames("nope")


def test_missing_root_and_duplicate_names(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        VideoFolderSource(tmp_path / "missing")
    with pytest.raises(SourceError, match="does not exist"):
        get_source("videos", None)
    write_video(tmp_path / "x.mp4", n=2)
    write_images(tmp_path / "x", ["0.png"])
    src = VideoFolderSource(tmp_path)  # a name taken twice: the first in name order is the scene, the other listed
    assert src.scenes() == ["x"] and src.frames("x")[0].path.endswith("0.png")
    assert src.ignored() == [{"file": str(tmp_path / "x.mp4"), "reason": f"scene name 'x' is already {tmp_path / 'x'}"}]
