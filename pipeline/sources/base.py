"""The one small interface every dataset adapter implements.

A source is a list of scenes; a scene is a time-ordered list of frames; a frame can be opened as
RGB uint8. Adapters know nothing of clips, encoders or stores: the clip index and the cache job
are built on this interface alone, so adding a dataset touches nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from pipeline.errors import Re2pixError


class SourceError(Re2pixError):
    """A source cannot be read: the message names the file and the reason."""


@dataclass(frozen=True)
class FrameRef:
    """One frame of a scene. `index` is its position in the scene's time order (0, 1, 2, ...);
    `timestamp` is in seconds; `path` names the file (or `file#frame` inside a video) for errors."""

    index: int
    timestamp: float
    path: str


class Source(ABC):
    """A dataset split seen as scenes of time-ordered frames.

    Subclasses set `name` (dataset name), `split`, `root` and `fps` (the dataset's own frame
    rate: clips keep it), and implement the three methods below. Everything must be
    deterministic: the same root gives the same scenes and frames in the same order. Sources are
    pickled to Ray workers: keep open files and decoders out of their pickled state.
    """

    name: str = "source"
    split: str = "train"
    root: str = ""
    fps: float = 10.0
    licence: str | None = None  # the dataset's licence terms as this adapter knows them (store cards show it)

    @abstractmethod
    def scenes(self) -> list[str]:
        """Scene names, sorted; each unique within the source."""

    @abstractmethod
    def frames(self, scene: str) -> list[FrameRef]:
        """The scene's frames in time order, `index` counting from 0."""

    @abstractmethod
    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        """The frame as an RGB uint8 array [H, W, 3] at its native resolution.
        Raises SourceError naming `frame.path` when it cannot be read."""

    def clip_windows(
        self, scene: str, frames: list[FrameRef], length: int, stride: int
    ) -> tuple[list[int], dict[str, int]]:
        """Start positions of the clips this scene allows (indices into `frames`), and how many
        windows were not made, by reason (reported in the cache summary and the manifest).

        The default slides a window of `length` frames by `stride`. Adapters override it where the
        dataset says otherwise (a gap in time, a fixed evaluation window)."""
        return list(range(0, len(frames) - length + 1, stride)), {}

    def ignored(self) -> list[dict]:
        """Files under the root that are no scene, each {"file", "reason"} (the cache job lists them)."""
        return []

    def reading_notes(self, clip_aspect: float) -> list[str]:
        """Warnings on how the listed scenes will be read into clips of width/height `clip_aspect` (mixed
        frame rates, frames stretched to another shape), each naming the option that changes it."""
        return []

    def read_targets(self, scene: str, frame: FrameRef) -> dict | None:
        """Optional per-pixel ground truth of a frame, at the frame's resolution: {"classes": uint8 [H, W]
        (indices into `target_classes()["names"]`), "depth": float32 [H, W] metres (inf: no surface)}.
        None (the default) when the source has none."""
        return None

    def target_classes(self) -> dict | None:
        """{"names": [class name per index], "moving": [indices of the moving classes]}, or None."""
        return None

    def forecastability(self, scene: str, frames: list[FrameRef], context_frames: int) -> dict | None:
        """How much of a clip's future its context shows, for `frames` (the clip's, in order) of which the
        first `context_frames` are context: {"forecastable_share": the fraction of the moving objects' pixels
        in the future frames that belong to objects in view in some context frame (1.0 where the future shows
        none), "entries": names of the objects the future frames show that no context frame had in view}; so the
        share is 1.0 exactly when there are no entries. None (the default) when the source cannot say."""
        return None

    def describe(self) -> dict:
        """What goes into a store's manifest about where the frames came from."""
        return {"dataset": self.name, "split": self.split, "source_root": str(self.root), "fps": float(self.fps)}
