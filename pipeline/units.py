"""Work units of the cache job: deterministic groups of consecutive clips.

Each feature frame is owned by exactly one unit (the unit of the first clip that uses it), so each
frame is encoded once and each store row has one writer. A unit's completion is one atomic marker
(see store.writer), so a killed job reruns only the units without one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .clips import ClipIndex


@dataclass
class UnitPlan:
    unit_id: str
    frames: list[tuple[str, int, float, str]]  # distinct frames to read: (scene, index, timestamp, path)
    clips: list[tuple[int, str, list[int]]]  # (clip, clip_id, positions of its K frames in `frames`)
    own: list[tuple[int, int]]  # (feature frame, position in `frames`) this unit encodes and writes

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> UnitPlan:
        return cls(**json.loads(s))


def plan_units(
    index: ClipIndex, unit_clips: int, first_clip: int = 0, stored_frames: int = 0, prefix: str = "unit"
) -> list[UnitPlan]:
    """Units of the clips from `first_clip` on. Frames of rows below `stored_frames` are already in the
    store (a store that grows, clips.grow_index): no unit encodes them again."""
    if unit_clips < 1:
        raise ValueError("unit_clips must be >= 1")
    frame_key = {(scene, f.index): row for row, (scene, f) in enumerate(index.frames)}
    owner: dict[int, int] = dict.fromkeys(range(stored_frames), -1)
    units = []
    for u, start in enumerate(range(first_clip, len(index.clips), unit_clips)):
        positions: dict[tuple[str, int], int] = {}
        frames, clips, own, own_rows = [], [], [], set()
        for c in range(start, min(start + unit_clips, len(index.clips))):
            clip = index.clips[c]
            pos = []
            for f in clip.frames:
                key = (clip.scene, f.index)
                if key not in positions:
                    positions[key] = len(frames)
                    frames.append((clip.scene, f.index, f.timestamp, f.path))
                pos.append(positions[key])
            clips.append((c, clip.clip_id, pos))
            for row in clip.feature_rows:
                if owner.setdefault(row, u) == u and row not in own_rows:
                    scene, f = index.frames[row]
                    own.append((row, positions[(scene, f.index)]))
                    own_rows.add(row)
        assert all(frame_key[(frames[p][0], frames[p][1])] == r for r, p in own)
        units.append(UnitPlan(f"{prefix}-{u:06d}", frames, clips, own))
    return units


def plan_frames(index: ClipIndex, num_frames: int, frames_per_unit: int = 16) -> list[UnitPlan]:
    """Units of feature frames only (no clips), evenly spread over the index: the PCA fitting sample."""
    total = len(index.frames)
    n = min(num_frames, total)
    rows = sorted({int(i * total / n) for i in range(n)}) if n else []
    units = []
    for u, start in enumerate(range(0, len(rows), frames_per_unit)):
        chunk = rows[start : start + frames_per_unit]
        frames = [
            (index.frames[r][0], index.frames[r][1].index, index.frames[r][1].timestamp, index.frames[r][1].path)
            for r in chunk
        ]
        units.append(UnitPlan(f"pca-{u:06d}", frames, [], [(r, p) for p, r in enumerate(chunk)]))
    return units
