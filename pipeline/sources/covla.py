"""CoVLA: front-camera drives at 20 Hz, as `videos/{scene_id}.mp4` or (mini layout)
`images/{scene_id}/NNNN.png`; a scene id present in both is read from its images.

Video timestamps come from the packets' pts (relative to the first frame); image timestamps are
NNNN / 20. Splits come from `split_file` (JSON {"train": [...], ...} or a text list); without one
only split "all" exists.

Videos are read through a forward decoder per video that keeps the last `cache_frames` decoded
frames (a sliding clip re-reads recent frames); a frame further back seeks to the keyframe before
it. At most two videos stay open per process.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import av
import numpy as np

from .base import FrameRef, Source, SourceError
from .common import load_split_file, read_rgb

_OPEN_VIDEOS = 2


class CovlaSource(Source):
    name = "covla"
    licence = (
        "the CoVLA Dataset's own terms (Turing Inc.): non-commercial research use, as stated on its"
        " Hugging Face page (turing-motors/CoVLA-Dataset)"
    )
    fps = 20.0

    def __init__(self, root, split="train", split_file=None, cache_frames=32):
        if root is None:
            raise SourceError("covla: a dataset root is required")
        self.root, self.split, self.split_file, self.cache_frames = str(root), split, split_file, int(cache_frames)
        videos = _ls(os.path.join(self.root, "videos"), lambda p: p.endswith(".mp4") and os.path.isfile(p))
        images = _ls(os.path.join(self.root, "images"), os.path.isdir)
        self._where = {os.path.splitext(v)[0]: ("video", os.path.join(self.root, "videos", v)) for v in videos}
        self._where.update({d: ("images", os.path.join(self.root, "images", d)) for d in images})
        if not self._where:
            raise SourceError(f"{self.root}: no videos/*.mp4 and no images/*/ folders")
        if split_file:
            wanted = set(load_split_file(str(split_file), split))
        elif split == "all":
            wanted = set(self._where)
        else:
            raise SourceError(
                f"covla split {split!r}: CoVLA has no official split here. Pass split_file=PATH "
                f'(a JSON {{"train": [scene ids], "val": [scene ids]}} or a text file with one '
                f"scene id per line for this split), or use split='all'."
            )
        self._scenes = sorted(wanted & set(self._where))
        self.missing_scenes = len(wanted - set(self._where))
        if not self._scenes:
            raise SourceError(f"{split_file or self.root}: none of the scenes of split {split!r} is under {self.root}")
        self._frames: dict[str, list[FrameRef]] = {}
        self._pts: dict[str, list[int]] = {}
        self._readers: OrderedDict[str, _VideoReader] = OrderedDict()

    def __getstate__(self):  # open decoders stay behind when the source is shipped to a worker
        return {**self.__dict__, "_readers": OrderedDict()}

    def scenes(self) -> list[str]:
        return list(self._scenes)

    def frames(self, scene: str) -> list[FrameRef]:
        if scene not in self._frames:
            kind, path = self._where[scene]
            if kind == "video":
                self._frames[scene], self._pts[scene] = _video_frames(path)
            else:
                self._frames[scene] = _image_frames(path, self.fps)
        return self._frames[scene]

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        kind, path = self._where[scene]
        if kind == "images":
            return read_rgb(frame.path)
        reader = self._readers.pop(scene, None)
        if reader is None:
            self.frames(scene)
            reader = _VideoReader(path, self._pts[scene], self.cache_frames)
        self._readers[scene] = reader  # most recently used last
        while len(self._readers) > _OPEN_VIDEOS:
            self._readers.popitem(last=False)[1].close()
        return reader.get(frame.index)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "split_file": str(self.split_file) if self.split_file else None,
            "missing_scenes": self.missing_scenes,
        }


def _ls(path, keep):
    return sorted(n for n in os.listdir(path) if keep(os.path.join(path, n))) if os.path.isdir(path) else []


def _image_frames(folder: str, fps: float) -> list[FrameRef]:
    stems = [(os.path.splitext(n)[0], n) for n in os.listdir(folder) if n.endswith(".png")]
    if not stems or not all(s.isdigit() for s, _ in stems):
        raise SourceError(f"{folder}: expected frames named NNNN.png")
    stems.sort(key=lambda sn: int(sn[0]))
    return [FrameRef(i, int(s) / fps, os.path.join(folder, n)) for i, (s, n) in enumerate(stems)]


def _video_frames(path: str) -> tuple[list[FrameRef], list[int]]:
    """Frames in presentation order and their pts, from the packets alone (no decoding)."""
    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            pts = sorted(p.pts for p in c.demux(stream) if p.pts is not None)
            tb = stream.time_base
    except (av.FFmpegError, OSError, IndexError) as e:
        raise SourceError(f"{path}: cannot read the video ({e})") from None
    if not pts:
        raise SourceError(f"{path}: no video frames")
    return [FrameRef(i, float((p - pts[0]) * tb), f"{path}#{i}") for i, p in enumerate(pts)], pts


class _VideoReader:
    """Decodes one video forward, keeping the last `keep` frames; an older frame restarts the
    decoder at the keyframe before it (or, should that seek overshoot, at the start)."""

    def __init__(self, path: str, pts: list[int], keep: int):
        self.path, self.pts, self.keep = path, pts, max(1, keep)
        self.position = {p: i for i, p in enumerate(pts)}
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.container = self.decoder = None
        self.last = -1  # index of the last frame decoded

    def get(self, i: int) -> np.ndarray:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i].copy()  # callers may write into it; the cache stays clean
        if self.decoder is None or i <= self.last:
            self._restart(i, seek=True)
        frame = self._decode_to(i)
        if frame is None and i > 0:
            self._restart(i, seek=False)
            frame = self._decode_to(i)
        if frame is None:
            raise SourceError(f"{self.path}#{i}: the decoder never produced this frame")
        return frame.copy()

    def _restart(self, i: int, seek: bool) -> None:
        self.close()
        try:
            self.container = av.open(self.path)
            stream = self.container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek and i > 0:
                self.container.seek(self.pts[i], stream=stream, backward=True)
            self.decoder = self.container.decode(stream)
        except (av.FFmpegError, OSError, IndexError) as e:
            raise SourceError(f"{self.path}: cannot open the video ({e})") from None
        self.last = -1

    def _decode_to(self, i: int) -> np.ndarray | None:
        try:
            for frame in self.decoder:
                j = self.position.get(frame.pts)
                if j is None:
                    raise SourceError(f"{self.path}: decoded a frame with pts {frame.pts} that no packet has")
                if j > i:  # passed it: the seek landed too late
                    return None
                self.last = j
                self.cache[j] = frame.to_ndarray(format="rgb24")
                while len(self.cache) > self.keep:
                    self.cache.popitem(last=False)
                if j == i:
                    return self.cache[j]
        except av.FFmpegError as e:
            raise SourceError(f"{self.path}#{i}: decoding failed ({e})") from None
        return None

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container = self.decoder = None
