"""A folder of driving videos and/or image sequences, one scene each.

Layout: `root/<split>/` if that folder exists, else `root/` itself. Each video file directly in it
(`.mp4 .mov .mkv .avi`) is a scene named by its stem; each sub-folder holding images (`.png .jpg
.jpeg`, in natural name order: `f2` before `f10`) is a scene named by the folder. A root that is one
video file, or one folder of images with no scenes in it, is a source of that one scene (how
`jobs.predict --video` reads its input).

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
DEFAULT_FPS = 10.0
SEEK_AHEAD = 64  # frames: jumps further ahead than this seek instead of decoding through
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)], path.name


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural)


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _header_rate(path: Path) -> float | None:
    try:
        with av.open(str(path)) as container:
            return _rate(container.streams.video[0]) if container.streams.video else None
    except _AV_ERRORS:
        return None


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
            self.buffer[frame.pts] = frame.to_ndarray(format="rgb24")
            while len(self.buffer) > self.buffer_frames:
                self.buffer.popitem(last=False)
            if frame.pts >= pts:
                return self.buffer.get(pts)
        return None


class VideoFolderSource(Source):
    """Scenes from video files and image folders (see the module docstring for layout and caching)."""

    name = "videos"
    licence = "the user's own videos: their licence is not known to re2pix"

    def __init__(self, root, split="train", fps=None, extensions=(".mp4", ".mov", ".mkv", ".avi"), buffer_frames=32):
        if root is None or not Path(root).exists():
            raise SourceError(f"videos: root folder {root!r} does not exist")
        self.root, self.split, self.buffer_frames = str(root), split, max(int(buffer_frames), 1)
        exts = tuple(e.lower() for e in extensions)
        self._scenes: dict[str, tuple[str, object]] = {}  # name -> ("video", path) | ("images", [paths])
        if Path(root).is_file():  # one video file: a source of that one scene
            if Path(root).suffix.lower() not in exts:
                raise SourceError(f"videos: {root} is not a video file ({' '.join(exts)})")
            self._add(Path(root).stem, ("video", Path(root)))
        else:
            folder = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_file() and entry.suffix.lower() in exts:
                    self._add(entry.stem, ("video", entry))
                elif entry.is_dir() and (images := _images(entry)):
                    self._add(entry.name, ("images", images))
            if not self._scenes and (images := _images(folder)):  # one folder of frames: that one scene
                self._add(folder.name, ("images", images))
        self._image_fps = float(fps) if fps else DEFAULT_FPS
        self.fps = self._image_fps
        if not fps:  # the first readable video's rate (an unreadable one fails later, in frames())
            for kind, where in (self._scenes[s] for s in self.scenes()):
                rate = _header_rate(where) if kind == "video" else None
                if rate:
                    self.fps = rate
                    break
        self._listings: dict[str, tuple[list[FrameRef], list[int]]] = {}
        self._decoders: OrderedDict[Path, _Decoder] = OrderedDict()
        self._lock = threading.Lock()

    def _add(self, name, scene):
        if name in self._scenes:
            raise SourceError(f"videos: two scenes named {name!r}: {self._scenes[name][1]} and {scene[1]}")
        self._scenes[name] = scene

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
        """(time base, sorted unique packet pts from the first keyframe on)."""
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
                return stream.time_base or Fraction(1, 1), sorted(pts)
        except _AV_ERRORS as err:
            raise SourceError(f"{path}: cannot read video: {err}") from err

    def _listing(self, scene: str) -> tuple[list[FrameRef], list[int]]:
        """The scene's frames and, for a video, their pts (cached: listing a video demuxes it)."""
        kind, where = self._scene(scene)
        if scene not in self._listings:
            if kind == "images":
                refs = [FrameRef(i, i / self._image_fps, str(p)) for i, p in enumerate(where)]
                self._listings[scene] = refs, []
            else:
                time_base, pts = self._probe(where)
                refs = [FrameRef(i, float(p * time_base), f"{where}#{i}") for i, p in enumerate(pts)]
                self._listings[scene] = refs, pts
        return self._listings[scene]

    def frames(self, scene: str) -> list[FrameRef]:
        return list(self._listing(scene)[0])

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        kind, where = self._scene(scene)
        refs, pts = self._listing(scene)
        if not 0 <= frame.index < len(refs):
            raise SourceError(f"{frame.path}: frame {frame.index} out of range (scene has {len(refs)})")
        if kind == "images":
            try:
                with Image.open(where[frame.index]) as im:
                    return np.array(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as err:
                raise SourceError(f"{where[frame.index]}: cannot read image: {err}") from err
        with self._lock:
            try:
                decoder = self._decoders.pop(where, None) or _Decoder(where, pts, self.buffer_frames)
                self._decoders[where] = decoder  # most recently used last
                while len(self._decoders) > 2:
                    self._decoders.popitem(last=False)[1].close()
                return decoder.get(frame.index).copy()  # the buffer keeps its own
            except _AV_ERRORS as err:
                if where in self._decoders:
                    self._decoders.pop(where).close()
                raise SourceError(f"{refs[frame.index].path}: cannot decode: {err}") from err
