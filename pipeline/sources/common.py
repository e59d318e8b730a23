"""Helpers the dataset adapters share: reading an image, reading a split file, gap-free windows."""

from __future__ import annotations

import json
from bisect import bisect_left

import numpy as np
from PIL import Image

from .base import FrameRef, SourceError


def read_rgb(path: str) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; SourceError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise SourceError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"{path}: cannot read image ({e})") from None


def load_split_file(path: str, split: str) -> list[str]:
    """Scene names of `split` from a JSON {"train": [...], "val": [...]} or a text file with one
    name per line (the whole file is the requested split; blank lines and # comments ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SourceError(f"{path}: cannot read split file ({e.strerror or e})") from None
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or split not in data:
            keys = sorted(data) if isinstance(data, dict) else []
            raise SourceError(f"{path}: no list for split {split!r} (expected a JSON object; keys: {keys})")
        names = data[split]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SourceError(f"{path}: split {split!r} must be a list of scene names")
        return names
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def gap_free_windows(
    frames: list[FrameRef], length: int, stride: int, max_gap_s: float, reason: str = "time gap"
) -> tuple[list[int], dict[str, int]]:
    """Window starts (sliding by `stride`) whose consecutive frames are never more than `max_gap_s` apart,
    and how many windows a gap ruled out."""
    gaps = [i for i in range(len(frames) - 1) if frames[i + 1].timestamp - frames[i].timestamp > max_gap_s]
    starts = []
    for s in range(0, len(frames) - length + 1, stride):
        k = bisect_left(gaps, s)  # first gap at or after s; the window holds gaps s .. s+length-2
        if k == len(gaps) or gaps[k] > s + length - 2:
            starts.append(s)
    skipped = len(range(0, len(frames) - length + 1, stride)) - len(starts)
    return starts, ({reason: skipped} if skipped else {})
