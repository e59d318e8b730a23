"""Figures of predictions: a labelled PNG grid in the paper's style (appendix 7), an mp4 writer, and
the grid and the side-by-side video of one prediction (`prediction_grid`, `prediction_video`).

A grid is a stack of sections (e.g. "context", bordered green, and "predicted", bordered blue); a
section is a title band followed by rows; a row is a text label followed by cells (frames, or None
for an empty cell). Every cell is shown at one size ``cell_hw`` inside a coloured border.
Layout, in pixels (``GridStyle`` names the numbers; defaults in brackets):

    width  = 2 margin [8] + label_width [150] + n (cell_w + 2 border [3]) + (n - 1) gap [4]
             with n the most columns of any section
    height = 2 margin + sum over sections of (title_height [18] + r (cell_h + 2 border) + (r - 1) gap)
             + (sections - 1) section_gap [12]

The title band holds the section title at the left (over the label column) and one caption per
column, centred over it. ``GridLayout.cell_origin(section, row, col)`` gives the (y, x) of a
cell's top-left pixel, inside its border. Cells of another size are resized (nearest when enlarged,
so feature patches stay sharp; antialiased bilinear when shrunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import InferenceError

if TYPE_CHECKING:
    from .prediction import Prediction

CONTEXT_BORDER = (46, 170, 70)  # green: context frames (paper appendix 7)
PREDICTED_BORDER = (40, 96, 220)  # blue: predicted frames


@dataclass
class Row:
    label: str
    cells: list  # uint8 [h, w, 3] arrays or None (an empty cell)


@dataclass
class Section:
    title: str
    rows: list[Row]
    border: tuple[int, int, int] = PREDICTED_BORDER
    captions: list[str] = field(default_factory=list)  # one per column, or none


@dataclass(frozen=True)
class GridStyle:
    margin: int = 8
    label_width: int = 150
    border: int = 3
    gap: int = 4
    title_height: int = 18
    section_gap: int = 12
    font_size: int = 12
    background: tuple[int, int, int] = (255, 255, 255)
    text: tuple[int, int, int] = (20, 20, 20)


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes for sections of shape [(rows, columns), ...] and cells of cell_hw."""

    shapes: tuple[tuple[int, int], ...]
    cell_hw: tuple[int, int]
    style: GridStyle = GridStyle()

    @property
    def columns(self) -> int:
        return max(c for _, c in self.shapes)

    @property
    def width(self) -> int:
        s, (_, cw), n = self.style, self.cell_hw, self.columns
        return 2 * s.margin + s.label_width + n * (cw + 2 * s.border) + (n - 1) * s.gap

    def section_height(self, i: int) -> int:
        s, r = self.style, self.shapes[i][0]
        return s.title_height + r * (self.cell_hw[0] + 2 * s.border) + (r - 1) * s.gap

    @property
    def height(self) -> int:
        n = len(self.shapes)
        return 2 * self.style.margin + sum(self.section_height(i) for i in range(n)) + (n - 1) * self.style.section_gap

    def section_top(self, i: int) -> int:
        return self.style.margin + sum(self.section_height(j) + self.style.section_gap for j in range(i))

    def cell_origin(self, section: int, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the cell image's top-left pixel (inside the border)."""
        s, (ch, cw) = self.style, self.cell_hw
        y = self.section_top(section) + s.title_height + row * (ch + 2 * s.border + s.gap) + s.border
        x = s.margin + s.label_width + col * (cw + 2 * s.border + s.gap) + s.border
        return y, x


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(cell: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    cell = np.asarray(cell)
    if cell.dtype != np.uint8 or cell.ndim != 3 or cell.shape[2] != 3:
        raise ValueError(f"cells must be uint8 RGB [h, w, 3], got {cell.dtype} {cell.shape}")
    if cell.shape[:2] == tuple(hw):
        return cell
    enlarge = cell.shape[0] <= hw[0] and cell.shape[1] <= hw[1]
    resample = Image.NEAREST if enlarge else Image.BILINEAR
    return np.asarray(Image.fromarray(cell).resize((hw[1], hw[0]), resample))


def make_grid(
    sections: list[Section], cell_hw: tuple[int, int] | None = None, style: GridStyle = GridStyle()
) -> np.ndarray:
    """Render the sections (module docstring) into one uint8 image [H, W, 3]."""
    if not sections or any(not sec.rows for sec in sections):
        raise ValueError("a grid needs at least one section, each with at least one row")
    if cell_hw is None:
        first = next((c for sec in sections for row in sec.rows for c in row.cells if c is not None), None)
        if first is None:
            raise ValueError("no cell to take the size from: pass cell_hw")
        cell_hw = tuple(np.asarray(first).shape[:2])
    shapes = tuple((len(sec.rows), max(1, max(len(r.cells) for r in sec.rows), len(sec.captions))) for sec in sections)
    layout = GridLayout(shapes, tuple(cell_hw), style)
    canvas = Image.new("RGB", (layout.width, layout.height), style.background)
    draw, font = ImageDraw.Draw(canvas), _font(style.font_size)
    ch, cw, b = *layout.cell_hw, style.border
    for i, sec in enumerate(sections):
        top = layout.section_top(i)
        mid = top + style.title_height // 2
        draw.text((style.margin, mid), sec.title, fill=style.text, font=font, anchor="lm")
        for c, caption in enumerate(sec.captions):
            _, x = layout.cell_origin(i, 0, c)
            draw.text((x + cw // 2, mid), caption, fill=style.text, font=font, anchor="mm")
        for r, row in enumerate(sec.rows):
            y0, _ = layout.cell_origin(i, r, 0)
            draw.multiline_text((style.margin, y0 + ch // 2), row.label, fill=style.text, font=font, anchor="lm")
            for c, cell in enumerate(row.cells):
                if cell is None:
                    continue
                y, x = layout.cell_origin(i, r, c)
                draw.rectangle([x - b, y - b, x + cw + b - 1, y + ch + b - 1], fill=tuple(sec.border))
                canvas.paste(Image.fromarray(_fit(cell, layout.cell_hw)), (x, y))
    return np.asarray(canvas)


def header_height(lines: int, style: GridStyle = GridStyle()) -> int:
    """Pixels a header of `lines` text lines adds above a grid (`with_header`)."""
    return style.margin + lines * (style.font_size + 6)


def with_header(image: np.ndarray, lines: list[str], style: GridStyle = GridStyle()) -> np.ndarray:
    """`image` under a band of text lines (what the picture shows: run, checkpoint steps, clip, frames)."""
    band = Image.new("RGB", (image.shape[1], header_height(len(lines), style)), style.background)
    draw, font = ImageDraw.Draw(band), _font(style.font_size)
    for i, line in enumerate(lines):
        draw.text((style.margin, style.margin + i * (style.font_size + 6)), line, fill=style.text, font=font)
    return np.concatenate([np.asarray(band), image])


def features_to_rgb(
    features: np.ndarray, reference: np.ndarray | None = None, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """PCA feature maps [..., h, w, C >= 3] -> uint8 RGB [..., h, w, 3] from the first three components.

    Each component is scaled to [0, 1] between its `percentiles` over `reference` (default: the
    maps themselves; pass every map of a clip so that colours agree across rows and time), then
    clipped: a few extreme tokens cannot wash the picture out.
    """
    f = np.asarray(features, np.float32)[..., :3]
    ref = f if reference is None else np.asarray(reference, np.float32)[..., :3]
    if f.shape[-1] < 3:
        raise ValueError(f"need at least 3 feature channels, got {f.shape[-1]}")
    flat = ref.reshape(-1, 3)
    lo, hi = np.percentile(flat, percentiles[0], axis=0), np.percentile(flat, percentiles[1], axis=0)
    scaled = (f - lo) / np.maximum(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def frame_panels(
    columns: list[tuple[str, list]],
    num_context: int,
    style: GridStyle | None = None,
    cell_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Video frames [T, H, W, 3]: frame k shows every column's k-th cell side by side, each column
    captioned, the row labelled "frame k / context|predicted", bordered green for context frames
    (k < num_context) and blue after. Layout: one section of one row (``GridStyle(label_width=90)``)."""
    style = style or GridStyle(label_width=90)
    length = max(len(cells) for _, cells in columns)
    out = []
    for k in range(length):
        context = k < num_context
        label = f"frame {k}\n{'context' if context else 'predicted'}"
        cells = [cells[k] if k < len(cells) else None for _, cells in columns]
        sec = Section(
            "",
            [Row(label, cells)],
            CONTEXT_BORDER if context else PREDICTED_BORDER,
            captions=[name for name, _ in columns],
        )
        out.append(make_grid([sec], cell_hw=cell_hw or _first_hw(columns), style=style))
    return np.stack(out)


def _first_hw(columns) -> tuple[int, int]:
    for _, cells in columns:
        for c in cells:
            if c is not None:
                return tuple(np.asarray(c).shape[:2])
    raise ValueError("no frame in any column")


def save_png(path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path


def write_mp4(path, frames: np.ndarray, fps: float = 10.0, crf: int = 18) -> Path:
    """Write uint8 frames [T, H, W, 3] as H.264 (yuv420p; MPEG-4 Part 2 where libx264 is missing).

    yuv420p needs even sizes: an odd height or width gets one more row/column of edge pixels.
    """
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    frames = np.pad(frames, pad, mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --------------------------------------------------------------------------- a prediction


def _cell_hw(frame_hw, cell_height):
    if not cell_height:
        return tuple(frame_hw)
    return int(cell_height), max(1, round(frame_hw[1] * cell_height / frame_hw[0]))


def prediction_grid(
    pred: Prediction,
    geometry,
    grid_frames: str = "features",
    cell_height: int | None = None,
    header: list[str] | None = None,
):
    """The paper's figure as uint8 [H, W, 3]: context frames and their DINOv2 features bordered green,
    then ground truth, the VAE reconstruction of its latents (what a perfect latent prediction would
    show: the ceiling), Baseline, Re2Pix and the forecast features bordered blue; features shown as RGB
    of their first three PCA components, on one colour scale for the whole clip. `header`: text lines
    above it (`with_header`)."""
    if grid_frames not in ("features", "all"):
        raise InferenceError(f"--grid-frames must be 'features' or 'all', got {grid_frames!r}")
    g, r = geometry, geometry.temporal_downsample
    m = g.context_latents
    feats = np.concatenate([pred.clip.features[:m, ..., :3], pred.forecast[..., :3]])  # [7, H, W, 3]
    rgb = features_to_rgb(feats)  # one colour scale for the whole clip
    step = r if grid_frames == "features" else 1
    ctx_cols = list(range(0, g.context_frames, step))
    fut_cols = [k for k in range(g.context_frames, g.clip_frames) if grid_frames == "all" or k % r == 0]

    def feature_cells(cols):
        return [rgb[k // r] if k % r == 0 else None for k in cols]

    gt = pred.frames.get("ground truth")
    ctx_rows = [
        Row("context frames", [gt[k] if gt is not None else pred.frames["Re2Pix"][k] for k in ctx_cols]),
        Row("DINOv2 features\n(PCA 1-3)", feature_cells(ctx_cols)),
    ]
    fut_rows = []
    if gt is not None and len(gt) == g.clip_frames:
        label = "ground truth" + ("\n(VAE reconstruction)" if pred.ground_truth == "vae_reconstruction" else "")
        fut_rows.append(Row(label, [gt[k] for k in fut_cols]))
    if _shows_reconstruction(pred):
        fut_rows.append(Row("VAE reconstruction\n(the ceiling)", [pred.reconstruction[k] for k in fut_cols]))
    for name in ("Baseline", "Re2Pix"):
        if name in pred.frames:
            fut_rows.append(Row(name, [pred.frames[name][k] for k in fut_cols]))
    fut_rows.append(Row("forecast features\n(Stage 1, PCA 1-3)", feature_cells(fut_cols)))
    sections = [
        Section(
            f"context: frames 0-{g.context_frames - 1}", ctx_rows, CONTEXT_BORDER, [f"frame {k}" for k in ctx_cols]
        ),
        Section(
            f"predicted: frames {g.context_frames}-{g.clip_frames - 1}",
            fut_rows,
            PREDICTED_BORDER,
            [f"frame {k}" for k in fut_cols],
        ),
    ]
    frame_hw = pred.frames["Re2Pix"].shape[1:3]
    grid = make_grid(sections, cell_hw=_cell_hw(frame_hw, cell_height))
    return with_header(grid, header) if header else grid


def _shows_reconstruction(pred: Prediction) -> bool:
    """A reconstruction row beside real frames (when the ground truth is the reconstruction, it is that row)."""
    return pred.reconstruction is not None and pred.ground_truth in ("source_frames", "video")


def prediction_video(pred: Prediction, geometry, cell_height: int | None = None) -> np.ndarray:
    """Panels [25, H, W, 3]: ground truth | Baseline | Re2Pix | features, frame by frame."""
    g, r = geometry, geometry.temporal_downsample
    m = g.context_latents
    rgb = features_to_rgb(np.concatenate([pred.clip.features[:m, ..., :3], pred.forecast[..., :3]]))
    columns = [
        (name, list(pred.frames[name])) for name in ("ground truth", "Baseline", "Re2Pix") if name in pred.frames
    ]
    columns.append(("features", [rgb[-(-k // r)] for k in range(g.clip_frames)]))
    frame_hw = pred.frames["Re2Pix"].shape[1:3]
    return frame_panels(columns, g.context_frames, cell_hw=_cell_hw(frame_hw, cell_height))


def figure_rows(pred: Prediction, geometry) -> list[str]:
    """The predicted section's rows, top to bottom (a ground truth shorter than a clip has none)."""
    rows = [k for k, v in pred.frames.items() if k != "ground truth" or len(v) == geometry.clip_frames]
    if _shows_reconstruction(pred):
        rows.insert(1 if rows[0] == "ground truth" else 0, "VAE reconstruction")
    return rows + ["forecast features"]
