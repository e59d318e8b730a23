"""The synthetic source's ground truth (class map and depth) agrees with the frame it renders."""

import dataclasses

import numpy as np
import pytest

from pipeline.sources import get_source
from pipeline.sources.synthetic import CAR, CLASSES, PEDESTRIAN, SKY, render


@pytest.fixture(scope="module")
def source():
    return get_source("synthetic", split="val", seed=0, num_scenes=3, frames_per_scene=21)


def frames_of(source, n=3):
    for scene in source.scenes()[:n]:
        for ref in source.frames(scene)[::10]:
            yield scene, ref


def test_targets_have_the_frame_shape_and_leave_the_frame_unchanged(source):
    for scene, ref in frames_of(source):
        t = source.read_targets(scene, ref)
        frame = source.read_frame(scene, ref)
        assert t["classes"].dtype == np.uint8 and t["depth"].dtype == np.float32
        assert t["classes"].shape == t["depth"].shape == frame.shape[:2]
        assert t["classes"].max() < len(CLASSES)
        again, _, _ = render(source._scene(scene), ref.timestamp, source.height, source.width, targets=True)
        np.testing.assert_array_equal(again, frame)
    assert source.target_classes()["moving"] == [CAR, PEDESTRIAN]


@pytest.mark.parametrize("kind, label", [("cars", CAR), ("people", PEDESTRIAN)])
def test_moving_class_pixels_are_where_the_object_is_drawn(source, kind, label):
    """Removing the cars (people) from the scene changes exactly the pixels labelled car (pedestrian),
    and what is behind them is farther away."""
    labelled = changed = 0
    for scene, ref in frames_of(source):
        sc = source._scene(scene)
        frame, classes, depth = render(sc, ref.timestamp, source.height, source.width, targets=True)
        empty = dataclasses.replace(sc, **{kind: []}, sky_cache={})
        behind_frame, behind_classes, behind_depth = render(
            empty, ref.timestamp, source.height, source.width, targets=True
        )
        diff = (frame != behind_frame).any(-1)
        mask = classes == label
        assert not (diff & ~mask).any(), f"{kind}: pixels changed outside the {CLASSES[label]} class"
        assert not (behind_classes == label).any()
        assert (depth[mask] <= behind_depth[mask] + 1e-3).all(), "an object is farther than what it hides"
        labelled, changed = labelled + mask.sum(), changed + (diff & mask).sum()
    assert labelled > 20
    assert changed >= 0.9 * labelled  # a car the colour of the road behind it is rare


def test_sky_is_at_the_top_and_the_ground_recedes_towards_the_horizon(source):
    h = source.height
    for scene, ref in frames_of(source):
        t = source.read_targets(scene, ref)
        rows = np.nonzero(t["classes"] == SKY)[0]
        assert len(rows) and rows.max() < 0.45 * h  # above the horizon
        assert np.isinf(t["depth"][t["classes"] == SKY]).all()
        assert not (t["classes"][-1] == SKY).any()
        finite = t["depth"][np.isfinite(t["depth"])]
        assert finite.min() > 0
        # the road straight ahead: its depth falls row by row from the horizon to the bottom edge
        col = t["depth"][int(0.6 * h) :, source.width // 2]
        road = t["classes"][int(0.6 * h) :, source.width // 2]
        ground = col[road < 3]
        assert len(ground) > 5 and (np.diff(ground) < 0).all()


def test_sources_without_ground_truth_say_none(tmp_path):
    from pipeline.sources.base import FrameRef, Source

    class Bare(Source):
        def scenes(self):
            return ["a"]

        def frames(self, scene):
            return [FrameRef(0, 0.0, "a/0")]

        def read_frame(self, scene, frame):
            return np.zeros((8, 8, 3), np.uint8)

    assert Bare().read_targets("a", FrameRef(0, 0.0, "a/0")) is None
    assert Bare().target_classes() is None
