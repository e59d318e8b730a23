import pickle

import numpy as np
import pytest

from pipeline.sources import SourceError, get_source
from pipeline.sources.base import FrameRef
from pipeline.sources.synthetic import SyntheticSource


def small(**kw):
    return SyntheticSource(**{"num_scenes": 3, "frames_per_scene": 30, "height": 72, "width": 128, **kw})


def read(src, scene, i):
    return src.read_frame(scene, src.frames(scene)[i])


def test_listing_and_frames():
    src = small(fps=12.0)
    assert src.scenes() == ["scene-0000", "scene-0001", "scene-0002"]
    frames = src.frames("scene-0001")
    assert [f.index for f in frames] == list(range(30))
    assert frames[6].timestamp == pytest.approx(0.5)
    assert frames[6].path == "synthetic://scene-0001/000006"
    img = src.read_frame("scene-0001", frames[6])
    assert img.shape == (72, 128, 3) and img.dtype == np.uint8
    assert img.std() > 20  # a picture, not a flat fill
    assert src.describe()["source_root"] == "builtin:synthetic" and src.describe()["fps"] == 12.0


def test_get_source_passes_the_adapters_options_and_needs_no_data_root():
    # what the cache job's --source-options reach
    src = get_source("synthetic", None, "val", num_scenes=2, frames_per_scene=7, height=32, width=48, fps=5.0)
    assert src.split == "val" and len(src.scenes()) == 2 and len(src.frames(src.scenes()[1])) == 7
    assert read(src, src.scenes()[1], 6).shape == (32, 48, 3)
    assert src.frames(src.scenes()[0])[5].timestamp == pytest.approx(1.0)


def test_deterministic_per_seed():
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    for scene, i in (("scene-0000", 0), ("scene-0002", 17)):
        assert np.array_equal(read(a, scene, i), read(b, scene, i))
        assert not np.array_equal(read(a, scene, i), read(c, scene, i))


def test_random_access_order_independent():
    ordered = small()
    expected = [read(ordered, "scene-0001", i) for i in range(0, 30, 5)]
    shuffled = small()
    for i in (25, 0, 15, 10, 5, 20):  # another order, on a fresh instance, after other scenes
        read(shuffled, "scene-0000", 29 - i)
        assert np.array_equal(read(shuffled, "scene-0001", i), expected[i // 5])


def test_pickles_small_and_renders_the_same():
    src = small()
    image = read(src, "scene-0002", 9)
    data = pickle.dumps(src)
    assert len(data) < 2000  # the per-scene caches stay behind
    assert np.array_equal(read(pickle.loads(data), "scene-0002", 9), image)


def test_splits_and_scenes_differ():
    train, val = small(split="train"), small(split="val")
    assert not np.array_equal(read(train, "scene-0000", 3), read(val, "scene-0000", 3))
    assert not np.array_equal(read(train, "scene-0000", 3), read(train, "scene-0001", 3))


def test_motion_is_smooth():
    src = small()
    for scene in src.scenes():
        frames = [read(src, scene, i).astype(np.float32) for i in (0, 1, 20, 21)]
        step = (np.abs(frames[1] - frames[0]).mean() + np.abs(frames[3] - frames[2]).mean()) / 2
        far = np.abs(frames[2] - frames[0]).mean()
        assert step > 0.3  # things move every frame
        assert step < far / 2.5  # ... but consecutive frames are far closer than 2 s apart


def test_bad_requests_raise_source_error():
    src = small()
    with pytest.raises(SourceError, match="synthetic://scene-0000/000030"):
        src.read_frame("scene-0000", FrameRef(30, 3.0, "synthetic://scene-0000/000030"))
    with pytest.raises(SourceError, match="scene-0007"):
        src.frames("scene-0007")
    with pytest.raises(SourceError, match="nope"):
        src.read_frame("nope", FrameRef(0, 0.0, "synthetic://nope/000000"))
