"""nuScenes: CAM_FRONT keyframes and sweeps together (≈12 Hz), read straight from the JSON tables.

Layout: `{root}/{version}/{scene,sample,sample_data,calibrated_sensor,sensor}.json` and the images
they name (`samples/CAM_FRONT/*.jpg`, `sweeps/CAM_FRONT/*.jpg`). The official devkit is not used
(it pins numpy<2); its split lists are, when it imports. Frames are unevenly spaced and some are
missing, so clips never span a gap of more than 1.5 nominal frame intervals.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from .base import FrameRef, Source, SourceError
from .common import gap_free_windows, load_split_file, read_rgb

VERSIONS = ("v1.0-trainval", "v1.0-mini")  # preferred first


class NuScenesSource(Source):
    name = "nuscenes"
    licence = "CC BY-NC-SA 4.0 (nuScenes terms of use: non-commercial use; https://www.nuscenes.org/terms-of-use)"
    fps = 12.0

    def __init__(self, root, split="train", version=None, split_file=None, channel="CAM_FRONT", max_gap=1.5):
        if root is None:
            raise SourceError("nuscenes: a dataset root is required")
        self.root, self.split, self.channel, self.max_gap = str(root), split, channel, float(max_gap)
        self.version = version or next((v for v in VERSIONS if os.path.isdir(os.path.join(self.root, v))), None)
        if self.version is None:
            raise SourceError(f"{self.root}: no nuScenes table folder ({' or '.join(VERSIONS)})")
        self.table_dir = os.path.join(self.root, self.version)
        tokens = dict(self._columns("scene", "name", "token"))
        if split == "all":
            self.split_source, wanted = "all", sorted(tokens)
        else:
            self.split_source, wanted = self._split_names(split, split_file)
        self._tokens = {n: tokens[n] for n in sorted(set(wanted) & set(tokens))}
        self.missing_scenes = len(set(wanted) - set(tokens))  # named by the split, absent from the tables
        if not self._tokens:
            raise SourceError(
                f"{self.table_dir}/scene.json: none of the {len(wanted)} scenes of split "
                f"{split!r} ({self.split_source}) is in the tables"
            )
        self._frames: dict[str, list[FrameRef]] | None = None

    def _split_names(self, split, split_file):
        if split_file:
            return f"split_file {split_file}", load_split_file(str(split_file), split)
        try:
            from nuscenes.utils import splits as devkit_splits
        except Exception:  # noqa: BLE001 -- not installed, or broken (the devkit pins old numpy)
            devkit_splits = None
        if devkit_splits is not None:
            key = f"mini_{split}" if "mini" in self.version and split in ("train", "val") else split
            names = getattr(devkit_splits, key, None)
            if not isinstance(names, list):
                raise SourceError(f"nuscenes.utils.splits has no scene list {key!r}")
            return f"nuscenes.utils.splits.{key}", names
        raise SourceError(
            f"nuscenes split {split!r}: no split source. Pass split_file=PATH, either a JSON file "
            f'{{"train": [scene names], "val": [scene names]}} or a text file with one scene name per line '
            f"for this split; or install the nuScenes devkit so that nuscenes.utils.splits imports; "
            f"or use split='all' for every scene."
        )

    def _columns(self, table: str, *keys: str) -> list[tuple]:
        path = os.path.join(self.table_dir, table + ".json")
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except FileNotFoundError:
            raise SourceError(f"{path}: table not found") from None
        except (OSError, ValueError) as e:
            raise SourceError(f"{path}: cannot read JSON table ({e})") from None
        if not isinstance(rows, list):
            raise SourceError(f"{path}: expected a JSON list of records")
        try:
            return [tuple(r[k] for k in keys) for r in rows]
        except (KeyError, TypeError) as e:
            raise SourceError(f"{path}: a record lacks field {e} (needs {', '.join(keys)})") from None

    def _index(self) -> dict[str, list[FrameRef]]:
        if self._frames is not None:
            return self._frames
        sensors = {t for t, ch in self._columns("sensor", "token", "channel") if ch == self.channel}
        if not sensors:
            raise SourceError(f"{self.table_dir}/sensor.json: no sensor with channel {self.channel!r}")
        cams = {t for t, s in self._columns("calibrated_sensor", "token", "sensor_token") if s in sensors}
        sample_scene = dict(self._columns("sample", "token", "scene_token"))
        scene_name = {t: n for n, t in self._tokens.items()}
        rows = defaultdict(list)
        sd_path = os.path.join(self.table_dir, "sample_data.json")
        for sample, cam, filename, ts in self._columns(
            "sample_data", "sample_token", "calibrated_sensor_token", "filename", "timestamp"
        ):
            if cam not in cams:
                continue
            if sample not in sample_scene:
                raise SourceError(f"{sd_path}: sample_token {sample!r} is not in sample.json")
            name = scene_name.get(sample_scene[sample])
            if name is not None:
                if not isinstance(ts, (int, float)) or not isinstance(filename, str):
                    raise SourceError(f"{sd_path}: bad timestamp {ts!r} or filename {filename!r}")
                rows[name].append((ts, filename))
        self._frames = {
            name: [FrameRef(i, ts / 1e6, os.path.join(self.root, fn)) for i, (ts, fn) in enumerate(sorted(rows[name]))]
            for name in self._tokens
        }
        return self._frames

    def scenes(self) -> list[str]:
        return list(self._tokens)

    def frames(self, scene: str) -> list[FrameRef]:
        return self._index()[scene]

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        return read_rgb(frame.path)

    def clip_windows(self, scene, frames, length, stride):
        return gap_free_windows(
            frames, length, stride, self.max_gap / self.fps, f"time gap > {self.max_gap:g} frame intervals"
        )

    def describe(self) -> dict:
        return {
            **super().describe(),
            "version": self.version,
            "channel": self.channel,
            "split_source": self.split_source,
            "missing_scenes": self.missing_scenes,
        }
