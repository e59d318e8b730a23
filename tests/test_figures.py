"""The prediction grid's layout and sizes, feature colouring, video panels and the mp4 writer."""

import av
import numpy as np
import pytest

from inference.figures import (
    CONTEXT_BORDER,
    PREDICTED_BORDER,
    GridLayout,
    GridStyle,
    Row,
    Section,
    features_to_rgb,
    frame_panels,
    make_grid,
    save_png,
    write_mp4,
)


def cell(value, hw=(12, 20)):
    return np.full((*hw, 3), value, np.uint8)


def paper_sections():
    ctx = Section(
        "context",
        [Row("input", [cell(10 + i) for i in range(4)]), Row("features", [cell(50 + i) for i in range(4)])],
        CONTEXT_BORDER,
        captions=[f"t={t}" for t in (0, 4, 8, 12)],
    )
    fut = Section(
        "predicted",
        [
            Row(name, [cell(100 + 10 * r + i) for i in range(3)])
            for r, name in enumerate(["ground truth", "Baseline", "Re2Pix", "features"])
        ],
        PREDICTED_BORDER,
        captions=[f"t={t}" for t in (16, 20, 24)],
    )
    return [ctx, fut]


def test_grid_size_follows_the_documented_formula():
    style = GridStyle()
    grid = make_grid(paper_sections(), style=style)
    s, (ch, cw), n = style, (12, 20), 4  # 4 columns: the widest section
    width = 2 * s.margin + s.label_width + n * (cw + 2 * s.border) + (n - 1) * s.gap
    heights = [s.title_height + r * (ch + 2 * s.border) + (r - 1) * s.gap for r in (2, 4)]
    height = 2 * s.margin + sum(heights) + s.section_gap
    assert grid.shape == (height, width, 3) and grid.dtype == np.uint8
    layout = GridLayout(((2, 4), (4, 3)), (12, 20), style)
    assert (layout.height, layout.width) == (height, width)


def test_cells_sit_where_the_layout_says_inside_coloured_borders():
    sections = paper_sections()
    grid = make_grid(sections)
    layout = GridLayout(((2, 4), (4, 3)), (12, 20))
    b = layout.style.border
    for si, sec in enumerate(sections):
        for r, row in enumerate(sec.rows):
            for c, img in enumerate(row.cells):
                y, x = layout.cell_origin(si, r, c)
                assert np.array_equal(grid[y : y + 12, x : x + 20], img), (si, r, c)
                assert tuple(grid[y - b, x]) == sec.border  # top border
                assert tuple(grid[y + 12, x + 19]) == sec.border  # bottom border
                assert tuple(grid[y, x - 1]) == sec.border and tuple(grid[y, x + 20]) == sec.border
    # the predicted section's 4th column does not exist: background there
    y, x = layout.cell_origin(1, 0, 3)
    assert (grid[y : y + 12, x : x + 20] == 255).all()


def test_labels_and_titles_are_drawn_in_the_label_column():
    grid = make_grid(paper_sections())
    layout = GridLayout(((2, 4), (4, 3)), (12, 20))
    s = layout.style
    for si, rows in enumerate((2, 4)):
        for r in range(rows):
            y, _ = layout.cell_origin(si, r, 0)
            band = grid[y : y + 12, s.margin : s.margin + s.label_width]
            assert (band < 128).any(), f"no label text in section {si} row {r}"
        top = layout.section_top(si)
        assert (grid[top : top + s.title_height, s.margin : s.margin + s.label_width] < 128).any()


def test_empty_cells_and_resizing():
    sec = Section("x", [Row("a", [cell(7, (6, 10)), None, cell(9, (24, 40))])])
    grid = make_grid([sec], cell_hw=(12, 20))
    layout = GridLayout(((1, 3),), (12, 20))
    y, x = layout.cell_origin(0, 0, 0)
    assert (grid[y : y + 12, x : x + 20] == 7).all()  # enlarged (nearest)
    y, x = layout.cell_origin(0, 0, 1)
    assert (grid[y - 3 : y + 15, x - 3 : x + 23] == 255).all()  # no cell, no border
    y, x = layout.cell_origin(0, 0, 2)
    assert (grid[y : y + 12, x : x + 20] == 9).all()  # shrunk
    with pytest.raises(ValueError):
        make_grid([Section("empty", [])])


def test_features_to_rgb_uses_robust_percentiles_of_the_reference():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 8, 10, 8)).astype(np.float32)
    feats[0, 0, 0, :3] = 1e6  # one outlier token must not wash the picture out
    rgb = features_to_rgb(feats)
    assert rgb.shape == (3, 8, 10, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [255, 255, 255]
    assert 40 < rgb[1:].mean() < 215
    ref = np.concatenate([feats, feats * 3])
    assert not np.array_equal(features_to_rgb(feats, ref), rgb)  # scaling comes from the reference


def test_frame_panels_mark_context_and_predicted_frames():
    frames = [cell(i * 10) for i in range(5)]
    panels = frame_panels([("ground truth", frames), ("Re2Pix", frames[:2] + [None] * 3)], num_context=2)
    style = GridStyle(label_width=90)
    layout = GridLayout(((1, 2),), (12, 20), style)
    assert panels.shape == (5, layout.height, layout.width, 3)
    y, x = layout.cell_origin(0, 0, 0)
    assert tuple(panels[1, y - 1, x]) == CONTEXT_BORDER and tuple(panels[2, y - 1, x]) == PREDICTED_BORDER
    assert np.array_equal(panels[3, y : y + 12, x : x + 20], frames[3])
    y, x = layout.cell_origin(0, 0, 1)
    assert (panels[3, y : y + 12, x : x + 20] == 255).all()


def test_write_mp4_round_trip(tmp_path):
    t, h, w = 6, 33, 47  # odd sizes get padded to even ones
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack(
        [np.stack([(xx * 5 + k * 20) % 256, yy * 7 % 256, np.full_like(xx, 128)], -1) for k in range(t)]
    ).astype(np.uint8)
    path = write_mp4(tmp_path / "out" / "clip.mp4", frames, fps=10)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert (stream.width, stream.height) == (48, 34)
        assert abs(float(stream.average_rate) - 10) < 1e-6
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
    assert decoded.shape == (t, 34, 48, 3)
    assert np.abs(decoded[:, :h, :w].astype(int) - frames).mean() < 12  # lossy, but the same picture
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", frames.astype(np.float32))


def test_save_png_writes_the_image(tmp_path):
    from PIL import Image

    grid = make_grid(paper_sections())
    path = save_png(tmp_path / "g" / "grid.png", grid)
    assert np.array_equal(np.asarray(Image.open(path)), grid)
