"""Read and resize a work unit's frames (the decode stage's body; stages.DecodeStage): a frame that
cannot be read fails every clip that needs it, and only those."""

from __future__ import annotations

import json

import numpy as np

from ..frames import hflip, resize_frames
from ..sources.base import FrameRef, Source, SourceError
from ..store.geometry import Geometry
from ..units import UnitPlan


def read_unit(
    plan: UnitPlan, source: Source, geometry: Geometry, variants: list[str], with_clips: bool, window: int = 1
) -> dict:
    """Read and resize a unit's frames. A frame that cannot be read fails every clip that needs it.
    window > 1 (a video feature encoder): each feature frame comes with the window of scene frames
    ending at it, dino_frames [N, window, H, W, 3] (encoders/video.py)."""
    images, failures, bad = {}, [], {}
    for pos, (scene, index, ts, path) in enumerate(plan.frames):
        try:
            images[pos] = _rgb(np.asarray(source.read_frame(scene, FrameRef(index, ts, path))), path)
        except Exception as e:  # noqa: BLE001 -- any reader error fails only this frame's clips
            bad[pos] = f"{type(e).__name__}: {e}"
    windows = _read_windows(plan, source, geometry, window, images, bad) if window > 1 else {}
    ok_clips = []
    for clip, clip_id, pos in plan.clips:
        broken = [p for p in pos if p in bad]
        if broken:
            failures.append({"clip_id": clip_id, "file": plan.frames[broken[0]][3], "reason": bad[broken[0]]})
        else:
            ok_clips.append((clip, pos))
    own_ok = [(row, p) for row, p in plan.own if p not in bad]
    flip = "hflip" in variants

    def prepared(positions, hw):
        if not positions:
            return np.zeros((0, *hw, 3), np.uint8)
        # each frame resized on its own: a scene may hold frames of different sizes
        x = np.stack([resize_frames(images[p][None], hw)[0] for p in positions])
        return np.concatenate([x, hflip(x)]) if flip else x  # variant-major: all orig, then all hflip

    def prepared_windows(positions, hw):  # [N, window, h, w, 3]
        if not positions:
            return np.zeros((0, window, *hw, 3), np.uint8)
        x = resize_frames(np.concatenate([windows[p] for p in positions]), hw).reshape(-1, window, *hw, 3)
        return np.concatenate([x, hflip(x)]) if flip else x

    own_pos = [p for _, p in own_ok]
    out = {
        "plan": plan.to_json(),
        "failures": json.dumps(failures),
        "own_rows": json.dumps([r for r, _ in own_ok]),
        "dino_frames": (
            prepared_windows(own_pos, geometry.dino_input_hw)
            if window > 1
            else prepared(own_pos, geometry.dino_input_hw)
        ),
    }
    if with_clips:
        needed = sorted({p for _, pos in ok_clips for p in pos})
        local = {p: i for i, p in enumerate(needed)}
        out["vae_frames"] = prepared(needed, geometry.vae_input_hw)
        out["clips"] = json.dumps([[clip, [local[p] for p in pos]] for clip, pos in ok_clips])
    return out


def _read_windows(plan: UnitPlan, source: Source, geometry: Geometry, window: int, images: dict, bad: dict) -> dict:
    """For each feature frame of the unit (owned, or used by its clips): the `window` scene frames ending
    at it (the scene's first frame repeated before its start), [window, H, W, 3]. An unreadable window
    frame fails the feature frame, so every clip that uses it fails in every unit, not only the owner's."""
    scene_refs, windows, own = {}, {}, {p for _, p in plan.own}
    known = {(s, i): p for p, (s, i, _, _) in enumerate(plan.frames)}
    used = {p for _, p in plan.own} | {pos[o] for _, _, pos in plan.clips for o in geometry.feature_frame_offsets}
    for pos in sorted(used):
        if pos in bad:
            continue
        scene, index = plan.frames[pos][0], plan.frames[pos][1]
        refs = scene_refs.setdefault(scene, list(source.frames(scene)))
        at = next(k for k, r in enumerate(refs) if r.index == index)
        frames = []
        for ref in (refs[max(0, k)] for k in range(at - window + 1, at + 1)):
            p = known.get((scene, ref.index))
            try:
                img = images[p] if p in images else np.asarray(source.read_frame(scene, ref))
                frames.append(_rgb(img, ref.path))
            except Exception as e:  # noqa: BLE001 -- fails only this feature frame's clips
                bad[pos] = f"{ref.path}: {type(e).__name__}: {e}"
                break
        else:
            if len({f.shape for f in frames}) > 1:
                bad[pos] = f"{plan.frames[pos][3]}: the frames of its window differ in size"
            elif pos in own:
                windows[pos] = np.stack(frames)
    return windows


def _rgb(img: np.ndarray, path: str) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SourceError(f"{path}: source returned {img.dtype} {img.shape}, expected uint8 [H, W, 3]")
    return img
