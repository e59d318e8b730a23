"""Tiny fake dataset trees in the real on-disk layouts of nuScenes, Cityscapes, KITTI raw and CoVLA.

Every frame is a small generated picture whose brightness encodes (scene, frame): `frame_image`
gives the exact pixels, so lossless formats can be compared exactly and lossy ones (JPEG, H.264)
by `frame_level`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

SIZE = (48, 80)  # H, W


def frame_level(scene: int, frame: int) -> int:
    """The mean grey level of a frame (distinct for neighbouring frames, far from 0 and 255)."""
    return 24 + (scene * 71 + frame * 37) % 200


def frame_image(scene: int, frame: int, size=SIZE) -> np.ndarray:
    """RGB uint8 [H, W, 3]: a flat level with a mild horizontal ramp (survives JPEG and H.264)."""
    h, w = size
    ramp = np.linspace(-8, 8, w)[None, :, None]
    img = np.full((h, w, 3), frame_level(scene, frame), np.float64) + ramp
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(img).save(path)


def make_nuscenes(
    root,
    scenes=2,
    frames_per_scene=30,
    version="v1.0-trainval",
    size=SIZE,
    keyframe_every=6,
    drop: dict[int, list[int]] | None = None,
    write_split=True,
) -> dict:
    """CAM_FRONT keyframes (every `keyframe_every`-th frame) and sweeps at ≈12 Hz with ±1 ms jitter,
    plus CAM_BACK and LIDAR_TOP records (tables only) interleaved in time; sample_data is stored
    shuffled. `drop` maps a scene number to frame numbers left out (tables and files).

    Returns {"scenes": {name: [absolute CAM_FRONT paths in time order]}, "timestamps": {name: [s]},
    "split_file": path of {"train": all scenes but the last, "val": [last]} (when write_split)}.
    """
    root, drop = Path(root), drop or {}
    tables = {k: [] for k in ("scene", "sample", "sample_data", "calibrated_sensor", "sensor")}
    for ch, mod in (("CAM_FRONT", "camera"), ("CAM_BACK", "camera"), ("LIDAR_TOP", "lidar")):
        tables["sensor"].append({"token": f"sensor-{ch}", "channel": ch, "modality": mod})
        tables["calibrated_sensor"].append({"token": f"calib-{ch}", "sensor_token": f"sensor-{ch}"})
    out = {"scenes": {}, "timestamps": {}}
    for s in range(scenes):
        name, t0 = f"scene-{s + 1:04d}", 1_532_402_927_000_000 + s * 100_000_000
        tables["scene"].append({"token": f"scene-tok-{s}", "name": name, "description": "fake"})
        kept = [i for i in range(frames_per_scene) if i not in set(drop.get(s, ()))]
        keys = list(range(0, frames_per_scene, keyframe_every))
        for k in keys:
            tables["sample"].append(
                {"token": f"sample-{s}-{k}", "scene_token": f"scene-tok-{s}", "timestamp": t0 + round(k * 1e6 / 12)}
            )
        paths, stamps = [], []
        for i in range(frames_per_scene):
            ts = t0 + round(i * 1e6 / 12) + (i % 3 - 1) * 1000
            owner = f"sample-{s}-{min((k for k in keys if k >= i), default=keys[-1])}"  # sweeps precede their sample
            for ch, offset in (("CAM_BACK", 20_000), ("LIDAR_TOP", 41_000)):
                tables["sample_data"].append(
                    {
                        "token": f"sd-{ch}-{s}-{i}",
                        "sample_token": owner,
                        "calibrated_sensor_token": f"calib-{ch}",
                        "filename": f"sweeps/{ch}/fake-s{s}__{ch}__{ts + offset}.jpg",
                        "timestamp": ts + offset,
                        "is_key_frame": False,
                    }
                )
            if i not in kept:
                continue
            key = i in keys
            rel = f"{'samples' if key else 'sweeps'}/CAM_FRONT/n008-fake-s{s}__CAM_FRONT__{ts}.jpg"
            tables["sample_data"].append(
                {
                    "token": f"sd-CAM_FRONT-{s}-{i}",
                    "sample_token": owner,
                    "calibrated_sensor_token": "calib-CAM_FRONT",
                    "filename": rel,
                    "timestamp": ts,
                    "is_key_frame": key,
                    "fileformat": "jpg",
                }
            )
            _save(root / rel, frame_image(s, i, size))
            paths.append(str(root / rel))
            stamps.append(ts / 1e6)
        out["scenes"][name], out["timestamps"][name] = paths, stamps
    order = np.random.default_rng(0).permutation(len(tables["sample_data"]))
    tables["sample_data"] = [tables["sample_data"][j] for j in order]
    (root / version).mkdir(parents=True, exist_ok=True)
    for table, rows in tables.items():
        (root / version / f"{table}.json").write_text(json.dumps(rows))
    if write_split:
        names = sorted(out["scenes"])
        out["split_file"] = str(root / "split.json")
        Path(out["split_file"]).write_text(json.dumps({"train": names[:-1], "val": names[-1:]}))
    return out


def make_cityscapes(root, split="train", snippets=(("aachen", 0, 0, 30),), size=SIZE) -> list[str]:
    """`leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png` for each snippet
    (city, seq, first frame number, frame count); frame f of snippet n looks like frame_image(n, f).
    Returns the scene names the adapter should find (one per snippet, if the snippets don't touch)."""
    names = []
    for n, (city, seq, first, count) in enumerate(snippets):
        d = Path(root) / "leftImg8bit_sequence" / split / city
        for f in range(count):
            _save(d / f"{city}_{seq:06d}_{first + f:06d}_leftImg8bit.png", frame_image(n, f, size))
        names.append(f"{city}_{seq:06d}_{first:06d}")
    return names


def kitti_timestamp(drive: int, frame: int) -> tuple[str, float]:
    """A KITTI raw timestamp line (nanoseconds, ~10.36 Hz) and its value in seconds since the epoch."""
    ns = frame * 103_650_000 + drive * 7_000_000 + 964_389_445
    sec, frac = divmod(ns, 10**9)
    start = dt.datetime(2011, 9, 26, 13, 2, 25) + dt.timedelta(hours=drive, seconds=sec)
    t = (start - dt.datetime(1970, 1, 1)).total_seconds()
    return start.strftime("%Y-%m-%d %H:%M:%S") + f".{frac:09d}", t + frac / 1e9


def make_kitti(root, drives=(("2011_09_26", 1, 8), ("2011_09_26", 5, 6)), size=SIZE, camera="image_02") -> dict:
    """`{date}/{date}_drive_{n:04d}_sync/{camera}/data/{i:010d}.png` and `{camera}/timestamps.txt`
    for (date, drive number, frame count). Returns {drive folder: [timestamps in seconds]}."""
    out = {}
    for k, (date, n, count) in enumerate(drives):
        name = f"{date}_drive_{n:04d}_sync"
        cam = Path(root) / date / name / camera
        lines, stamps = zip(*(kitti_timestamp(n, i) for i in range(count)))
        for i in range(count):
            _save(cam / "data" / f"{i:010d}.png", frame_image(k, i, size))
        (cam / "timestamps.txt").write_text("\n".join(lines) + "\n")
        out[name] = list(stamps)
    return out


def make_covla(
    root,
    videos=(("2022-07-14--14-27-53--10_first", 12),),
    images=(("2022-07-15--09-11-02--20_first", 6),),
    size=SIZE,
    fps=20,
) -> dict:
    """`videos/{id}.mp4` (H.264 with B-frames, `fps`) and `images/{id}/NNNN.png` (the mini layout).
    Scene k (videos first, then image folders) frame f looks like frame_image(k, f).
    Returns {scene id: frame count}."""
    import av

    out = {}
    for k, (sid, count) in enumerate(videos):
        path = Path(root) / "videos" / f"{sid}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as c:
            st = c.add_stream("libx264", rate=fps)
            st.width, st.height, st.pix_fmt = size[1], size[0], "yuv420p"
            st.options = {
                "crf": "12",
                "threads": "1",  # B-frames: packets leave presentation order
                "x264-params": "bframes=2:b-adapt=0:keyint=6:min-keyint=6:scenecut=0",
            }
            for f in range(count):
                for p in st.encode(av.VideoFrame.from_ndarray(frame_image(k, f, size), format="rgb24")):
                    c.mux(p)
            for p in st.encode():
                c.mux(p)
        out[sid] = count
    for k, (sid, count) in enumerate(images, start=len(videos)):
        for f in range(count):
            _save(Path(root) / "images" / sid / f"{f:04d}.png", frame_image(k, f, size))
        out[sid] = count
    return out


def corrupt(path, text="{not json") -> None:
    """Overwrite a file with garbage (a malformed table or image)."""
    Path(path).write_text(text)


__all__ = [
    "SIZE",
    "corrupt",
    "frame_image",
    "frame_level",
    "kitti_timestamp",
    "make_cityscapes",
    "make_covla",
    "make_kitti",
    "make_nuscenes",
]


# A folder of videos (the `videos` source): one flat colour per frame
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def colour(i: int) -> np.ndarray:
    """A distinct flat colour per frame, far enough apart to survive lossy coding."""
    return np.array([(i * 23) % 200 + 30, 220 - (i * 7) % 190, (i * 61) % 200 + 30], np.uint8)


def write_video(path, n=30, rate=15, codec=CODEC, offset=0):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(n):
            image = np.broadcast_to(colour(i + offset), (64, 96, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
