"""The clip index: a deterministic list of clips and of the frames their features need.

Clip ids are stable across reruns and machines (`{scene}-{start:06d}`, characters limited to
[A-Za-z0-9_-] so that WebDataset keys stay whole). Scenes whose names reduce to one id (`drive 1`,
`drive_1`) stay apart: a scene whose name is that id keeps it, the others add a hash of their own name
(`drive_1_3f2a9c01`). Overlapping clips share feature frames: the frame table lists each (scene, frame)
once, and every clip points into it with 7 rows. Every input is accounted for: an unreadable scene is a
failure, a scene too short for one clip and each file the source ignores are listed in `ignored`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .sources.base import FrameRef, Source, SourceError
from .store.geometry import Geometry

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(name: str) -> str:
    """A scene name reduced to [A-Za-z0-9_-] (runs of anything else become one '_')."""
    return _UNSAFE.sub("_", name).strip("_") or "scene"


@dataclass(frozen=True)
class Clip:
    clip_id: str
    scene: str
    start: int  # position of the clip's first frame in the scene's frame list
    frames: tuple[FrameRef, ...]  # the clip's K frames, in order
    feature_rows: tuple[int, ...]  # rows of ClipIndex.frames for frames 0, 4, ..., K-1

    @property
    def timestamps(self) -> list[float]:
        return [f.timestamp for f in self.frames]


@dataclass
class ClipIndex:
    clips: list[Clip]
    frames: list[tuple[str, FrameRef]]  # unique feature frames (scene, frame), in first-use order
    skipped: dict[str, int]  # why windows were not made into clips -> how many
    failures: list[dict] = field(default_factory=list)  # scenes that could not be read: clip_id, file, reason
    ignored: list[dict] = field(default_factory=list)  # inputs that make no clip: file, reason
    notes: list[str] = field(default_factory=list)  # how the source reads the scenes, worth a warning

    def __len__(self) -> int:
        return len(self.clips)


def scene_ids(scenes: list[str]) -> dict[str, str]:
    """Each scene's id: its safe name, made distinct with a hash of the name where several share one."""
    by_id: dict[str, list[str]] = {}
    for scene in scenes:
        by_id.setdefault(safe_name(scene), []).append(scene)
    ids = {}
    for sid, named in by_id.items():
        for scene in named:
            unique = len(named) == 1 or scene == sid
            ids[scene] = sid if unique else f"{sid}_{hashlib.sha1(scene.encode()).hexdigest()[:8]}"
    return ids


def build_clip_index(source: Source, geometry: Geometry, stride: int = 1, progress: bool = True) -> ClipIndex:
    """Slide a K-frame window over every scene (the source may veto windows, e.g. on time gaps).
    A scene that cannot be read (an unreadable video) is listed in `failures`, one too short for a clip
    and the files the source ignores in `ignored`; the others go on."""
    if stride < 1:
        raise ValueError("stride must be >= 1")
    clips: list[Clip] = []
    frame_rows: dict[tuple[str, int], int] = {}
    frames: list[tuple[str, FrameRef]] = []
    skipped: dict[str, int] = {}
    failures: list[dict] = []
    ignored = list(source.ignored())
    k = geometry.clip_frames
    ids = scene_ids(source.scenes())
    for scene in tqdm(source.scenes(), desc=f"index {source.name}", unit="scene", disable=not progress):
        sid = ids[scene]
        try:
            scene_frames = source.frames(scene)
        except SourceError as e:
            message = str(e)
            file = message.split(": ", 1)[0] if ": " in message else scene
            failures.append({"clip_id": sid, "file": file, "reason": message})
            continue
        if len(scene_frames) < k:
            file = scene_frames[0].path.rsplit("#", 1)[0] if scene_frames else scene
            reason = f"too short for a clip: {len(scene_frames)} frames, a clip has {k}"
            ignored.append({"file": file, "reason": reason})
            continue
        starts, reasons = source.clip_windows(scene, scene_frames, k, stride)
        for reason, n in reasons.items():
            skipped[reason] = skipped.get(reason, 0) + n
        for start in starts:
            window = tuple(scene_frames[start : start + k])
            if len(window) != k:
                raise ValueError(f"{source.name}: window at {start} of scene {scene!r} is shorter than {k}")
            rows = []
            for offset in geometry.feature_frame_offsets:
                key = (scene, window[offset].index)
                if key not in frame_rows:
                    frame_rows[key] = len(frames)
                    frames.append((scene, window[offset]))
                rows.append(frame_rows[key])
            clips.append(Clip(f"{sid}-{start:06d}", scene, start, window, tuple(rows)))
    notes = source.reading_notes(geometry.vae_input_hw[1] / geometry.vae_input_hw[0])
    return ClipIndex(clips, frames, skipped, failures, ignored, notes)


def grow_index(stored_ids: list[str], stored_rows: list[list[int]], stored_frames: list, index: ClipIndex) -> ClipIndex:
    """A store's clips in their rows, then the clips of `index` the store lacks (in the index's order): the
    clip index of a store that grows. `stored_frames` [(scene, FrameRef)] are the store's frame rows; a new
    clip reuses a stored frame row where it needs that frame, its other frames get rows after them.
    A stored clip the source no longer holds, or whose frames changed, is a ValueError: a store only grows."""
    by_id = {c.clip_id: c for c in index.clips}
    frame_row = {(scene, f.index): r for r, (scene, f) in enumerate(stored_frames)}
    frames, clips = list(stored_frames), []
    for clip_id, rows in zip(stored_ids, stored_rows):
        clip = by_id.get(clip_id)
        if clip is None:
            raise ValueError(f"the store's clip {clip_id} is no longer in the source (a store only grows)")
        now = [(index.frames[r][0], index.frames[r][1].index, index.frames[r][1].timestamp) for r in clip.feature_rows]
        then = [(stored_frames[r][0], stored_frames[r][1].index, stored_frames[r][1].timestamp) for r in rows]
        if now != then:
            raise ValueError(f"the frames of the store's clip {clip_id} changed in the source since it was cached")
        clips.append(Clip(clip_id, clip.scene, clip.start, clip.frames, tuple(rows)))
    stored = set(stored_ids)
    for clip in index.clips:
        if clip.clip_id in stored:
            continue
        rows = []
        for r in clip.feature_rows:
            scene, f = index.frames[r]
            if (scene, f.index) not in frame_row:
                frame_row[(scene, f.index)] = len(frames)
                frames.append((scene, f))
            rows.append(frame_row[(scene, f.index)])
        clips.append(Clip(clip.clip_id, clip.scene, clip.start, clip.frames, tuple(rows)))
    return ClipIndex(clips, frames, index.skipped, index.failures, index.ignored, index.notes)
