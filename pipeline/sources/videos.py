"""A folder of driving videos and/or image sequences, one scene each.

Layout: `root/<split>/` if that folder exists, else `root/` itself. Each video file directly in it
(`.mp4 .mov .mkv .avi .webm`) is a scene named by its stem; each sub-folder holding images (`.png .jpg
.jpeg`, in natural name order: `f2` before `f10`) is a scene named by the folder. A root that is one
video file, or one folder of images with no scenes in it, is a source of that one scene (how
`jobs.predict --video` reads its input). Anything else in the folder (another file type, a sub-folder
without images, such as one holding more videos) is listed by `ignored()` with the reason; hidden
files (`.name`) are passed over.

Frames are read as players show them: a video's rotation flag (the display matrix, e.g. a phone's
portrait video stored landscape) turns each decoded frame by its multiple of 90 degrees. Each video keeps
its own frame rate unless `resample_fps` reads every video at that one rate (the nearest frame to each
tick of its clock, frames dropped or repeated); `crop_aspect` (width / height) centre-crops every frame
to that shape before the pipeline resizes it, instead of stretching it. `reading_notes` warns, naming
these options, when the videos' rates differ or their shape is far from the clips'.

Video frames are listed by demuxing (no decoding): presentation timestamps are the packets' pts
(`pts * time_base` seconds), sorted, from the first keyframe on. Reading decodes sequentially: each
process keeps an LRU of two open decoders, each with the last `buffer_frames` decoded frames, so a
clip read in order costs one decode per frame and overlapping clips (stride < clip length) are
served from the buffer. A frame behind the buffer, or far ahead of it, is reached by seeking to the
keyframe before it (reopening from the start if the container cannot seek there).
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .base import FrameRef, Source, SourceError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
DEFAULT_FPS = 10.0
ASPECT_TOLERANCE = 1.15  # frames stretched by more than this (width / height ratio) are warned about
SEEK_AHEAD = 64  # frames: jumps further ahead than this seek instead of decoding through
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)], path.name


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural)


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _why_ignored(entry: Path, exts: tuple[str, ...]) -> str:
    if entry.is_file():
        return f"not a video ({' '.join(exts)}) nor in a folder of images"
    below = sum(1 for p in entry.rglob("*") if p.suffix.lower() in exts + IMAGE_EXTENSIONS)
    if below:
        files = "1 video or image" if below == 1 else f"{below} videos or images"
        return f"a folder with no images directly in it ({files} further down {'is' if below == 1 else 'are'} not read)"
    return "a folder with no images in it"


def _header_rate(path: Path) -> float | None:
    try:
        with av.open(str(path)) as container:
            return _rate(container.streams.video[0]) if container.streams.video else None
    except _AV_ERRORS:
        return None


def upright(frame) -> np.ndarray:
    """A decoded frame as RGB [H, W, 3], turned as its rotation flag says (counter-clockwise degrees, as
    players and ffmpeg apply the display matrix)."""
    image = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def centre_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centred part of `image` whose width / height is `aspect`."""
    h, w = image.shape[:2]
    if w / h > aspect:
        keep = max(1, round(h * aspect))
        return image[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    keep = max(1, round(w / aspect))
    return image[(h - keep) // 2 : (h - keep) // 2 + keep]


def on_clock(times: list[float], fps: float) -> list[int]:
    """Positions in `times` (sorted seconds) of the frame nearest each tick t0 + n / fps up to the last."""
    picked = []
    for n in range(int((times[-1] - times[0]) * fps + 1e-6) + 1):
        t = times[0] + n / fps
        i = bisect_left(times, t)
        picked.append(i if i == 0 or (i < len(times) and times[i] - t < t - times[i - 1]) else i - 1)
    return picked


class _Decoder:
    """One open video decoded forward, with a buffer of its latest frames keyed by pts."""

    def __init__(self, path: Path, pts: list[int], buffer_frames: int):
        self.path, self.pts, self.buffer_frames = path, pts, buffer_frames
        self.buffer: OrderedDict[int, np.ndarray] = OrderedDict()
        self.container = None
        self._open(None)

    def _open(self, seek_pts):
        self.close()
        self.container = av.open(str(self.path))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        if seek_pts is not None:  # lands on the keyframe at or before seek_pts
            self.container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        self.frames = self.container.decode(stream)
        self.first = self.last = None  # pts of the first and latest frames decoded since opening

    def close(self):
        if self.container is not None:
            self.container.close()
            self.container = None

    def get(self, position: int) -> np.ndarray:
        pts = self.pts[position]
        if pts in self.buffer:
            return self.buffer[pts]
        behind = self.last is not None and pts < self.last
        far_ahead = self.last is not None and position - bisect_left(self.pts, self.last) > SEEK_AHEAD
        if behind or far_ahead:
            self._open(pts)
        image = self._decode_to(pts)
        if image is None and self.first is not None and self.first > pts:  # the seek overshot
            self._open(None)
            image = self._decode_to(pts)
        if image is None:
            raise SourceError(f"{self.path}#{position}: the decoder gave no frame at pts {pts}")
        return image

    def _decode_to(self, pts: int) -> np.ndarray | None:
        for frame in self.frames:
            if frame.pts is None:
                continue
            if self.first is None:
                self.first = frame.pts
                if frame.pts > pts:
                    return None
            self.last = frame.pts
            self.buffer[frame.pts] = upright(frame)
            while len(self.buffer) > self.buffer_frames:
                self.buffer.popitem(last=False)
            if frame.pts >= pts:
                return self.buffer.get(pts)
        return None


class VideoFolderSource(Source):
    """Scenes from video files and image folders (see the module docstring for layout and caching)."""

    name = "videos"
    licence = "the user's own videos: their licence is not known to re2pix"

    def __init__(
        self,
        root,
        split="train",
        fps=None,
        extensions=VIDEO_EXTENSIONS,
        buffer_frames=32,
        resample_fps=None,
        crop_aspect=None,
    ):
        if root is None or not Path(root).exists():
            raise SourceError(f"videos: root folder {root!r} does not exist")
        for name, value in (("resample_fps", resample_fps), ("crop_aspect", crop_aspect)):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (number and 0 < value < float("inf")):
                raise SourceError(f"videos: {name} must be a number > 0, got {value!r}")
        self.root, self.split, self.buffer_frames = str(root), split, max(int(buffer_frames), 1)
        self.resample_fps, self.crop_aspect = resample_fps, crop_aspect
        exts = tuple(e.lower() for e in extensions)
        self._scenes: dict[str, tuple[str, object]] = {}  # name -> ("video", path) | ("images", [paths])
        self._ignored: list[dict] = []
        if Path(root).is_file():  # one video file: a source of that one scene
            if Path(root).suffix.lower() not in exts:
                raise SourceError(f"videos: {root} is not a video file ({' '.join(exts)})")
            self._add(Path(root).stem, ("video", Path(root)))
        else:
            folder = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
            loose = []  # files that are no scene (images, when the folder is no image sequence itself)
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_file() and entry.suffix.lower() in exts:
                    self._add(entry.stem, ("video", entry))
                elif entry.is_dir() and (images := _images(entry)):
                    self._add(entry.name, ("images", images))
                else:
                    loose.append(entry)
            if not self._scenes and (images := _images(folder)):  # one folder of frames: that one scene
                self._add(folder.name, ("images", images))
                loose = [e for e in loose if e not in images]
            self._ignored += [{"file": str(e), "reason": _why_ignored(e, exts)} for e in loose]
        self._image_fps = float(fps) if fps else DEFAULT_FPS
        self.fps = float(resample_fps) if resample_fps else self._image_fps
        if not fps and not resample_fps:  # the first readable video's rate (an unreadable one fails later)
            for kind, where in (self._scenes[s] for s in self.scenes()):
                rate = _header_rate(where) if kind == "video" else None
                if rate:
                    self.fps = rate
                    break
        self._listings: dict[str, tuple[list[FrameRef], list[int]]] = {}
        self._shapes: dict[str, tuple[float, int, int]] = {}  # listed videos: (own fps, width, height as shown)
        self._decoders: OrderedDict[Path, _Decoder] = OrderedDict()
        self._lock = threading.Lock()

    def _add(self, name, scene):
        if name in self._scenes:  # drive.mp4 and drive.mkv: the first in name order is the scene
            taken = self._scenes[name][1]
            where = scene[1] if scene[0] == "video" else scene[1][0].parent
            taken = taken if self._scenes[name][0] == "video" else taken[0].parent
            self._ignored.append({"file": str(where), "reason": f"scene name {name!r} is already {taken}"})
            return
        self._scenes[name] = scene

    def ignored(self) -> list[dict]:
        return list(self._ignored)

    def __getstate__(self):  # open decoders and locks stay in their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_decoders", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _decoders=OrderedDict(), _lock=threading.Lock())

    def scenes(self) -> list[str]:
        return sorted(self._scenes)

    def _scene(self, scene):
        if scene not in self._scenes:
            raise SourceError(f"videos: no scene {scene!r} under {self.root}")
        return self._scenes[scene]

    @staticmethod
    def _probe(path: Path):
        """(time base, sorted unique packet pts from the first keyframe on, (own fps, width, height as shown))."""
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SourceError(f"{path}: no video stream")
                stream = container.streams.video[0]
                pts, keyed = set(), False
                for packet in container.demux(stream):
                    keyed = keyed or packet.is_keyframe
                    if keyed and packet.size:
                        if packet.pts is None:
                            raise SourceError(f"{path}: packets without timestamps are not supported")
                        pts.add(packet.pts)
                time_base, rate = stream.time_base or Fraction(1, 1), _rate(stream) or 0.0
            with av.open(str(path)) as container:  # the first frame: its size as shown (rotation applied)
                first = next(container.decode(video=0), None)
                h, w = upright(first).shape[:2] if first is not None else (0, 0)
            return time_base, sorted(pts), (rate, w, h)
        except _AV_ERRORS as err:
            raise SourceError(f"{path}: cannot read video: {err}") from err

    def _listing(self, scene: str) -> tuple[list[FrameRef], list]:
        """The scene's frames and what reads each: its image file, or its pts in the video (cached: listing
        a video demuxes it). With resample_fps, the frames nearest the ticks of that clock."""
        kind, where = self._scene(scene)
        if scene not in self._listings:
            if kind == "images":
                times, keys, names = [i / self._image_fps for i in range(len(where))], list(where), list(where)
            else:
                time_base, pts, self._shapes[scene] = self._probe(where)
                times, keys, names = [float(p * time_base) for p in pts], pts, [f"{where}#{i}" for i in range(len(pts))]
            picked = on_clock(times, self.resample_fps) if self.resample_fps and times else range(len(times))
            step = 1 / self.resample_fps if self.resample_fps else None
            refs = [FrameRef(n, times[0] + n * step if step else times[i], str(names[i])) for n, i in enumerate(picked)]
            self._listings[scene] = refs, [keys[i] for i in picked]
        return self._listings[scene]

    def frames(self, scene: str) -> list[FrameRef]:
        return list(self._listing(scene)[0])

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        image = self._read(scene, frame)
        return centre_crop(image, self.crop_aspect) if self.crop_aspect else image

    def _read(self, scene: str, frame: FrameRef) -> np.ndarray:
        kind, where = self._scene(scene)
        refs, keys = self._listing(scene)
        if not 0 <= frame.index < len(refs):
            raise SourceError(f"{frame.path}: frame {frame.index} out of range (scene has {len(refs)})")
        if kind == "images":
            try:
                with Image.open(keys[frame.index]) as im:
                    return np.array(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as err:
                raise SourceError(f"{keys[frame.index]}: cannot read image: {err}") from err
        with self._lock:
            try:
                decoder = self._decoders.pop(where, None) or _Decoder(where, keys, self.buffer_frames)
                self._decoders[where] = decoder  # most recently used last
                while len(self._decoders) > 2:
                    self._decoders.popitem(last=False)[1].close()
                return decoder.get(frame.index).copy()  # the buffer keeps its own
            except _AV_ERRORS as err:
                if where in self._decoders:
                    self._decoders.pop(where).close()
                raise SourceError(f"{refs[frame.index].path}: cannot decode: {err}") from err

    def reading_notes(self, clip_aspect: float) -> list[str]:
        """Mixed frame rates and shapes far from the clips' among the scenes listed so far (module doc)."""
        notes = []
        rates: dict[float, list[str]] = {}
        for scene, (fps, _, _) in sorted(self._shapes.items()):
            rates.setdefault(round(fps, 2), []).append(Path(self._scenes[scene][1]).name)
        if any(kind == "images" for kind, _ in self._scenes.values()):
            rates.setdefault(round(self._image_fps, 2), []).append("image folders")
        if len(rates) > 1 and not self.resample_fps:
            listed = "; ".join(f"{r:g} fps: {_some(names)}" for r, names in sorted(rates.items()))
            notes.append(
                f"videos: frame rates differ ({listed}): each clip keeps its video's own rate, so clips of one "
                f"length span different times; --source-options '{{\"resample_fps\": {self.fps:g}}}' reads "
                "every video at one rate"
            )
        stretched = []
        for scene, (_, w, h) in sorted(self._shapes.items()):
            aspect = self.crop_aspect or (w / h if h else clip_aspect)
            if max(aspect / clip_aspect, clip_aspect / aspect) > ASPECT_TOLERANCE:
                stretched.append(f"{Path(self._scenes[scene][1]).name} {w}x{h}")
        if stretched:
            notes.append(
                f"videos: frames of another shape than the clips' ({clip_aspect:.2f}:1) are stretched to it "
                f"({_some(stretched)}); --source-options '{{\"crop_aspect\": {clip_aspect:.4g}}}' centre-crops "
                "them to the clips' shape instead"
            )
        return notes


def _some(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
