"""KITTI raw: the left colour camera (`image_02`) of each synced drive, ≈10 Hz.

Layout: `{root}/{date}/{date}_drive_{n:04d}_sync/image_02/data/*.png` with one line per image in
`image_02/timestamps.txt` (`2011-09-26 13:02:25.964389445`). A scene is a drive folder.

The paper uses KITTI for zero-shot evaluation only, so there is no train split here: "val",
"test" and "all" each take every drive, and "train" is refused unless `allow_train=True`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime

import numpy as np

from .base import FrameRef, Source, SourceError
from .common import read_rgb

_DATE = re.compile(r"^\d{4}_\d{2}_\d{2}$")
_DRIVE = re.compile(r"^\d{4}_\d{2}_\d{2}_drive_\d{4}_sync$")
_EPOCH = datetime(1970, 1, 1)


def parse_timestamp(line: str) -> float:
    """`2011-09-26 13:02:25.964389445` -> seconds since the epoch (the clock taken as UTC)."""
    whole, _, frac = line.strip().partition(".")
    if not frac.isdigit():
        raise ValueError(f"bad fractional seconds in {line.strip()!r}")
    return (datetime.strptime(whole, "%Y-%m-%d %H:%M:%S") - _EPOCH).total_seconds() + int(frac) / 10 ** len(frac)


class KittiSource(Source):
    name = "kitti"
    licence = (
        "CC BY-NC-SA 3.0 (KITTI Vision Benchmark Suite: non-commercial use; https://www.cvlibs.net/datasets/kitti/)"
    )
    fps = 10.0

    def __init__(self, root, split="train", camera="image_02", allow_train=False):
        if root is None:
            raise SourceError("kitti: a dataset root is required")
        if split == "train" and not allow_train:
            raise SourceError(
                "kitti has no train split: the paper uses KITTI for zero-shot evaluation only "
                "(use split 'val', 'test' or 'all', or pass allow_train=True)"
            )
        if split not in ("train", "val", "test", "all"):
            raise SourceError(f"kitti: unknown split {split!r} (val, test and all each take every drive)")
        self.root, self.split, self.camera = str(root), split, camera
        try:
            dates = sorted(
                d for d in os.listdir(self.root) if _DATE.match(d) and os.path.isdir(os.path.join(self.root, d))
            )
        except OSError as e:
            raise SourceError(f"{self.root}: cannot list the folder ({e.strerror or e})") from None
        self._drives = {}
        for date in dates:
            for d in os.listdir(os.path.join(self.root, date)):
                if _DRIVE.match(d) and os.path.isdir(os.path.join(self.root, date, d)):
                    self._drives[d] = os.path.join(self.root, date, d, camera)
        if not self._drives:
            raise SourceError(f"{self.root}: no {{date}}/{{date}}_drive_NNNN_sync folders found")
        self._frames: dict[str, list[FrameRef]] = {}

    def scenes(self) -> list[str]:
        return sorted(self._drives)

    def frames(self, scene: str) -> list[FrameRef]:
        if scene not in self._frames:
            cam = self._drives[scene]
            data = os.path.join(cam, "data")
            try:
                images = sorted(f for f in os.listdir(data) if f.endswith(".png"))
            except OSError as e:
                raise SourceError(f"{data}: cannot list the images ({e.strerror or e})") from None
            ts_path = os.path.join(cam, "timestamps.txt")
            try:
                with open(ts_path, encoding="utf-8") as f:
                    lines = [ln for ln in f.read().splitlines() if ln.strip()]
                stamps = [parse_timestamp(ln) for ln in lines]
            except OSError as e:
                raise SourceError(f"{ts_path}: cannot read ({e.strerror or e})") from None
            except ValueError as e:
                raise SourceError(f"{ts_path}: {e}") from None
            if len(stamps) != len(images):
                raise SourceError(f"{ts_path}: {len(stamps)} timestamps for {len(images)} images in {data}")
            self._frames[scene] = [
                FrameRef(i, t, os.path.join(data, fn)) for i, (t, fn) in enumerate(zip(stamps, images))
            ]
        return self._frames[scene]

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        return read_rgb(frame.path)

    def describe(self) -> dict:
        return {**super().describe(), "camera": self.camera}
