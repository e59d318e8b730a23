"""Cityscapes sequences: 30-frame snippets at 17 Hz around each annotated frame (-19 | +10).

Layout: `{root}/leftImg8bit_sequence/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png`.
One seq id can hold many snippets: a break in the frame numbering starts a new one. A scene is
one snippet, named `{city}_{seq}_{first frame:06d}`. The paper says 16 fps; the dataset's own
documentation says 17 Hz, which we keep.

Evaluation (split "val", `eval_clip=True` by default there): one clip per snippet, snippet frames
3-27 (13 context frames 3-15, 12 predicted frames 16-27; the annotated snippet frame 19 is clip
frame 16). Elsewhere windows slide.

Annotations (the semantic evaluation): `{root}/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png`,
or `..._labelIds.png` mapped to trainIds with `TRAIN_IDS`.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from .base import FrameRef, Source, SourceError
from .common import read_rgb

_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit\.png$")
EVAL_START, EVAL_LENGTH = 3, 25  # snippet frames 3..27
# labelIds -> trainIds (cityscapesscripts' labels.py); every other labelId is 255 (ignored)
TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


class CityscapesSource(Source):
    name = "cityscapes"
    licence = (
        "the Cityscapes dataset's own licence: non-commercial research and teaching only, no redist"
        "ribution, citation required (https://www.cityscapes-dataset.com/license/)"
    )
    fps = 17.0

    def __init__(self, root, split="train", eval_clip=None):
        if root is None:
            raise SourceError("cityscapes: a dataset root is required")
        self.root, self.split = str(root), split
        self.eval_clip = (split == "val") if eval_clip is None else bool(eval_clip)
        base = os.path.join(self.root, "leftImg8bit_sequence")
        if split == "all":
            splits = sorted(d for d in _listdir(base) if os.path.isdir(os.path.join(base, d)))
        else:
            splits = [split]
        numbers = defaultdict(list)  # (split, city, seq) -> frame numbers
        for sp in splits:
            split_dir = os.path.join(base, sp)
            for city in sorted(_listdir(split_dir)):
                city_dir = os.path.join(split_dir, city)
                if not os.path.isdir(city_dir):
                    continue
                for fn in os.listdir(city_dir):
                    if not fn.endswith(".png"):
                        continue
                    m = _NAME.match(fn)
                    if m is None or m["city"] != city:
                        raise SourceError(f"{os.path.join(city_dir, fn)}: not named {city}_SEQ_FRAME_leftImg8bit.png")
                    numbers[(sp, city, m["seq"])].append(int(m["frame"]))
        self._scenes: dict[str, list[FrameRef]] = {}
        for (sp, city, seq), nums in numbers.items():
            nums.sort()
            runs = [[nums[0]]]
            for n in nums[1:]:
                if n == runs[-1][-1] + 1:
                    runs[-1].append(n)
                else:
                    runs.append([n])
            for run in runs:
                d = os.path.join(base, sp, city)
                self._scenes[f"{city}_{seq}_{run[0]:06d}"] = [
                    FrameRef(i, n / self.fps, os.path.join(d, f"{city}_{seq}_{n:06d}_leftImg8bit.png"))
                    for i, n in enumerate(run)
                ]
        if not self._scenes:
            raise SourceError(f"{base}/{split}: no *_leftImg8bit.png frames found")

    def scenes(self) -> list[str]:
        return sorted(self._scenes)

    def frames(self, scene: str) -> list[FrameRef]:
        return self._scenes[scene]

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        return read_rgb(frame.path)

    def clip_windows(self, scene, frames, length, stride):
        if not self.eval_clip:
            return super().clip_windows(scene, frames, length, stride)
        if length != EVAL_LENGTH:
            raise ValueError(
                f"the Cityscapes evaluation clip is {EVAL_LENGTH} frames (snippet frames 3-27), "
                f"not {length}; pass eval_clip=False for sliding windows"
            )
        sliding = len(range(0, len(frames) - length + 1, stride))
        if len(frames) < EVAL_START + EVAL_LENGTH:
            return [], ({f"snippet shorter than {EVAL_START + EVAL_LENGTH} frames": sliding} if sliding else {})
        return [EVAL_START], ({"not the evaluation window (snippet frames 3-27)": sliding - 1} if sliding > 1 else {})

    def describe(self) -> dict:
        return {**super().describe(), "eval_clip": self.eval_clip}


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot list the folder ({e.strerror or e})") from None


def gtfine_root(root, split: str) -> Path | None:
    """`{root}/gtFine/{split}` when the dataset root holds the fine annotations, else None."""
    folder = Path(root) / "gtFine" / str(split)
    return folder if folder.is_dir() else None


def gtfine_train_ids(gtfine, scene: str, frame: int) -> np.ndarray | None:
    """The trainIds [H, W] uint8 of snippet frame `frame` (counted from the first frame of `scene`, a
    `{city}_{seq}_{first frame:06d}` snippet) under a `gtfine_root`; None when that frame has no annotation."""
    city, seq, first = scene.rsplit("_", 2)
    stem = Path(gtfine) / city / f"{city}_{seq}_{int(first) + frame:06d}_gtFine_"
    if Path(f"{stem}labelTrainIds.png").exists():
        return np.asarray(Image.open(f"{stem}labelTrainIds.png"))
    if Path(f"{stem}labelIds.png").exists():
        table = np.full(256, 255, np.uint8)
        for label_id, train_id in TRAIN_IDS.items():
            table[label_id] = train_id
        return table[np.asarray(Image.open(f"{stem}labelIds.png"))]
    return None
