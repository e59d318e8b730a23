"""The synthetic source's dynamics option (issue 27 item 3): "classic" renders what it always rendered, so
existing stores reproduce; "forecastable" makes a clip's future frames hold what its context shows moving on,
its rare entries labelled; every clip says how much of its future the context shows (forecastable_share)."""

import hashlib
import math

import numpy as np
import pytest

from pipeline.sources import SourceError, get_source
from pipeline.sources.reopen import reopen_source
from pipeline.sources.synthetic import MOVING_CLASSES, SyntheticSource, _depths, _in_view, _object_names, render
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store
from pipeline.store.tables import clip_forecastability
from tests.store_factory import make_store

K, CONTEXT = TINY.clip_frames, TINY.context_frames  # 25 frames, the first 13 context


def small(dynamics="classic", **kw):
    size = {"num_scenes": 3, "frames_per_scene": 49, "height": 72, "width": 128}
    return SyntheticSource(split="val", dynamics=dynamics, **{**size, **kw})


def clips(src, stride=4):
    for scene in src.scenes():
        frames = src.frames(scene)
        for start in range(0, len(frames) - K + 1, stride):
            yield scene, start, frames[start : start + K]


def digest(src) -> str:
    h = hashlib.sha256()
    for scene in src.scenes():
        for f in src.frames(scene)[::6]:
            h.update(src.read_frame(scene, f).tobytes())
            t = src.read_targets(scene, f)
            h.update(t["classes"].tobytes())
            h.update(t["depth"].tobytes())
    return h.hexdigest()


# sha256 of frames, class maps and depth rendered by main's pipeline/sources/synthetic.py (bc1e983), before
# the dynamics option: what the stores cached until then hold
MAIN_DIGESTS = [
    ({"seed": 0, "split": "train", "height": 72, "width": 128, "num_scenes": 3}, "b81fd3beb8379befa322"),
    ({"seed": 7, "split": "val", "height": 144, "width": 256, "num_scenes": 2}, "4ca1311237bb95fad9d2"),
]


@pytest.mark.parametrize("options, want", MAIN_DIGESTS)
def test_classic_is_the_default_and_renders_what_main_rendered(options, want):
    default = SyntheticSource(frames_per_scene=25, **options)
    assert default.dynamics == "classic"
    assert digest(default).startswith(want)
    assert digest(SyntheticSource(frames_per_scene=25, dynamics="classic", **options)).startswith(want)
    # its manifest record too, so a classic store made before the option resumes and grows as before
    assert set(default.describe()["generator"]) == {"seed", "num_scenes", "frames_per_scene", "height", "width"}


def test_forecastable_is_the_classic_scene_less_what_its_first_frame_does_not_show():
    classic, forecastable = small(), small("forecastable", entry_rate=0.0)
    differ = 0
    for scene in classic.scenes():
        first, last = classic.frames(scene)[0], classic.frames(scene)[-1]
        assert np.array_equal(classic.read_frame(scene, first), forecastable.read_frame(scene, first))
        differ += not np.array_equal(classic.read_frame(scene, last), forecastable.read_frame(scene, last))
    assert differ > 0  # later frames lack the traffic that came into view after the first


def test_without_entries_the_future_shows_only_what_the_context_showed():
    forecastable, classic = small("forecastable", entry_rate=0.0), small()
    for scene, _, frames in clips(forecastable):
        assert forecastable.forecastability(scene, frames, CONTEXT) == {"forecastable_share": 1.0, "entries": []}
    assert all(forecastable.entries(s) == {} for s in forecastable.scenes())
    # the same world under classic dynamics: cars overtake or come over the horizon into the future frames
    labels = [classic.forecastability(scene, frames, CONTEXT) for scene, _, frames in clips(classic)]
    assert sum(bool(x["entries"]) for x in labels) >= len(labels) // 4
    assert all((x["forecastable_share"] < 1) == bool(x["entries"]) for x in labels)


def test_what_the_last_context_frame_shows_moves_on_at_a_steady_pace():
    src = small("forecastable", num_scenes=4, entry_rate=0.0)
    checked = 0
    for scene, _, frames in clips(src, stride=6):
        sc = src._scene(scene)
        times = np.array([f.timestamp for f in frames])
        _, instances = render(sc, times[CONTEXT - 1], src.height, src.width, instances=True)
        drawn = np.unique(instances[instances > 0]) - 1  # objects the last context frame shows
        in_view, depth = _in_view(sc, times)[drawn], _depths(sc, times)[drawn]
        names = np.array(_object_names(sc))[drawn]
        assert not set(names) & sc.absent
        # each stays in view until it leaves it for good (past the image's side, or behind the camera)
        left = np.cumsum(~in_view[:, CONTEXT - 1 :], axis=1) > 0
        assert not (left & in_view[:, CONTEXT - 1 :]).any(), f"{scene}: an object came back into view"
        # at a steady pace: a straight line through its context depths predicts its future ones
        fit = np.polynomial.polynomial.polyfit(times[:CONTEXT], depth[:, :CONTEXT].T, 1)  # [2, objects]
        predicted = fit[0][:, None] + fit[1][:, None] * times[CONTEXT:]
        assert np.abs(predicted - depth[:, CONTEXT:]).max() < 1.5  # metres, 1.2 s ahead; the ego speeds up or slows
        checked += len(drawn)
    assert checked > 30


def test_entries_are_no_more_than_the_rate_and_labelled():
    rate, scenes = 0.3, 8
    src = small("forecastable", num_scenes=scenes, entry_rate=rate)
    duration = (src.frames_per_scene - 1) / src.fps
    counts = []
    for scene in src.scenes():
        sc, entries = src._scene(scene), src.entries(scene)
        counts.append(len(entries))
        in_view = _in_view(sc, np.arange(src.frames_per_scene) / src.fps)
        came_in = {
            name: int(seen.argmax())
            for name, seen in zip(_object_names(sc), in_view)
            if name not in sc.absent and seen.any() and not seen[0]
        }
        assert came_in == entries, f"{scene}: what comes into view after frame 0 is what the labels list"
    assert max(counts) <= math.ceil(rate * duration)
    assert sum(counts) <= rate * duration * scenes * 1.25 and sum(counts) > 0
    with_entries = 0
    for scene, start, frames in clips(src):
        labels = src.forecastability(scene, frames, CONTEXT)
        for name in labels["entries"]:  # an entry in a clip's future is a scene's entry after its context
            assert start + CONTEXT <= src.entries(scene)[name] < start + K
        assert (labels["forecastable_share"] < 1) == bool(labels["entries"])
        with_entries += bool(labels["entries"])
    assert with_entries > 0


def test_the_share_counts_the_moving_objects_pixels():
    src = small("forecastable", num_scenes=2, entry_rate=1.0)
    for scene in src.scenes():
        for f in src.frames(scene)[::8]:
            classes = src.read_targets(scene, f)["classes"]
            moving = np.isin(classes, MOVING_CLASSES)
            assert src._object_pixels(scene, f).sum() == moving.sum()
    # a clip whose future holds an entry: its share is the pixels of the others over all
    scene, start, frames = next(c for c in clips(src, stride=1) if src.forecastability(c[0], c[2], CONTEXT)["entries"])
    labels = src.forecastability(scene, frames, CONTEXT)
    names = _object_names(src._scene(scene))
    pixels = sum(src._object_pixels(scene, f) for f in frames[CONTEXT:])
    entering = np.isin(names, labels["entries"])
    assert labels["forecastable_share"] == pytest.approx(1 - pixels[entering].sum() / pixels.sum())
    assert 0 < labels["forecastable_share"] < 1


def test_a_store_says_which_dynamics_made_it_and_serves_each_clips_share(tmp_path):
    for dynamics, options in (("forecastable", {"entry_rate": 0.5}), ("classic", {})):
        src = SyntheticSource(
            split="val", num_scenes=1, frames_per_scene=37, height=72, width=128, dynamics=dynamics, **options
        )
        path = tmp_path / f"{dynamics}.zarr"
        make_store(path, source=src, variants=("orig", "hflip"))
        store = Store(str(path))
        generator = store.manifest["generator"]
        assert generator.get("dynamics", "classic") == dynamics
        reopened, why = reopen_source(store.manifest)
        assert why is None and reopened.dynamics == dynamics and reopened.entry_rate == src.entry_rate
        labels = clip_forecastability(store)
        t = store.clip_table
        assert len(labels["forecastable_share"]) == len(t["id"]) == 8  # 4 clips, each also flipped
        for row, (scene, start) in enumerate(zip(t["scene"], t["start"])):
            want = src.forecastability(str(scene), src.frames(str(scene))[start : start + K], CONTEXT)
            assert labels["forecastable_share"][row] == want["forecastable_share"]
            assert labels["entries"][row] == want["entries"]
    make_store(tmp_path / "counting.zarr")  # a source that cannot say
    assert clip_forecastability(Store(str(tmp_path / "counting.zarr"))) is None


@pytest.mark.parametrize(
    "options, names",
    [
        ({"dynamics": "smooth"}, r"dynamics must be one of classic, forecastable, got 'smooth'"),
        ({"dynamics": 1}, r"dynamics.*must be a str"),
        ({"entry_rate": 0.2}, r"entry_rate applies to dynamics 'forecastable' only"),
        ({"dynamics": "forecastable", "entry_rate": -1}, r"entry_rate must be a number >= 0"),
        ({"dynamics": "forecastable", "entry_rate": "often"}, r"entry_rate must be a number >= 0"),
        ({"dynamics": "forecastable", "entry_rate": float("inf")}, r"entry_rate must be a number >= 0"),
    ],
)
def test_bad_dynamics_options_are_one_line(options, names):
    with pytest.raises(SourceError, match=names) as e:
        get_source("synthetic", None, "train", **options)
    assert "\n" not in str(e.value) and str(e.value).startswith("synthetic: ")
