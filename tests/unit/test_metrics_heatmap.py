"""Expert-load pictures: cells, labelled axes and colour bar checked by pixels; the over-time
picture accumulating windows; images drawn on the background writer's thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from moe_dist.metrics import BackgroundSink, ExpertLoadTracker, LoadHistory, MetricsLogger, draw_heatmap
from moe_dist.metrics.expert_load import draw_load_over_time, load_color_max, render_load_over_time
from moe_dist.metrics.heatmap import INK, colorize
from moe_dist.moe.stats import ExpertLoadStats

# Ramp anchors x 255: 0 -> (0.15, 0.05, 0.35), 0.5 -> (0.15, 0.55, 0.55), 1 -> (0.98, 0.90, 0.15).
LOW, MID, HIGH, GREY = (38, 13, 89), (38, 140, 140), (250, 230, 38), (128, 128, 128)


def _pixel(image, row, col):
    return tuple(int(v) for v in image[:, row, col])


def _cell(image, layout, r, c):
    return _pixel(image, layout.plot.top + r * layout.cell_h + layout.cell_h // 2,
                  layout.plot.left + c * layout.cell_w + layout.cell_w // 2)


def _colour(value: float) -> tuple[int, ...]:
    return tuple(int(v) for v in np.round(colorize(np.array([[value]]))[:, 0, 0] * 255))


def _has_ink(region_chw) -> bool:
    """Text and tick marks: near-black pixels (the colour ramp's darkest is (38, 13, 89))."""
    return bool((region_chw.max(axis=0) < 90).any())


def test_cells_keep_their_colours_and_sizes():
    matrix = np.array([[0.0, 0.5], [1.0, np.nan]])
    image, layout = draw_heatmap(matrix, vmax=1.0)
    assert image.dtype == np.uint8 and image.shape[0] == 3
    assert (layout.cell_h, layout.cell_w) == (32, 32)  # small matrices: 32-pixel cells
    assert (layout.plot.height, layout.plot.width) == (64, 64)
    assert _cell(image, layout, 0, 0) == LOW
    assert _cell(image, layout, 0, 1) == MID
    assert _cell(image, layout, 1, 0) == HIGH
    assert _cell(image, layout, 1, 1) == GREY  # padding
    block = layout.plot.slice(image)[:, :32, :32]
    assert (block == block[:, :1, :1]).all()  # a cell is one uniform block
    # Default scale: the largest entry is the top colour.
    image, layout = draw_heatmap(np.array([[0.1, 0.2]]))
    assert layout.vmax == pytest.approx(0.2) and _cell(image, layout, 0, 1) == HIGH
    with pytest.raises(ValueError, match="rows, cols"):
        draw_heatmap(np.ones(4))


def test_axes_frame_and_colour_bar_are_drawn():
    image, layout = draw_heatmap(np.array([[0.0, 0.5], [1.0, 0.25]]), row_labels=[1, 3], vmax=1.0,
                                 title="expert load, step 7")
    _, height, width = image.shape
    plot, bar = layout.plot, layout.colorbar
    # A frame of ink around the matrix and around the bar.
    for box in (plot, bar):
        assert _pixel(image, box.top - 1, box.left + box.width // 2) == INK
        assert _pixel(image, box.top + box.height, box.left + box.width // 2) == INK
        assert _pixel(image, box.top + box.height // 2, box.left - 1) == INK
    # Row labels and axis title left of the matrix, column labels and title below it, bar labels
    # right of the bar, the title above the matrix.
    assert _has_ink(image[:, plot.top: plot.top + plot.height, : plot.left - 2])
    assert _has_ink(image[:, plot.top + plot.height + 2:, plot.left: plot.left + plot.width])
    assert _has_ink(image[:, bar.top - 6: bar.top + bar.height + 6, bar.left + bar.width + 2:])
    assert _has_ink(image[:, : plot.top - 2, plot.left: plot.left + plot.width])
    # The colour bar runs from vmax (top) to 0 (bottom) through the ramp.
    strip = bar.slice(image)[:, :, bar.width // 2]
    assert _pixel(strip[:, :, None], 0, 0) == HIGH and _pixel(strip[:, :, None], bar.height - 1, 0) == LOW
    assert _pixel(strip[:, :, None], (bar.height - 1) // 2, 0) == pytest.approx(MID, abs=3)
    # Labels come from the arguments: other row labels change only the row-label strip, another
    # vmax only the cells and the bar's labels.
    other, same_layout = draw_heatmap(np.array([[0.0, 0.5], [1.0, 0.25]]), row_labels=[5, 7], vmax=1.0,
                                      title="expert load, step 7")
    assert same_layout == layout
    assert (plot.slice(other) == plot.slice(image)).all()
    assert not (other[:, :, : plot.left - 2] == image[:, :, : plot.left - 2]).all()
    rescaled, _ = draw_heatmap(np.array([[0.0, 0.5], [1.0, 0.25]]), row_labels=[1, 3], vmax=2.0,
                               title="expert load, step 7")
    right = slice(bar.left + bar.width + 2, min(width, rescaled.shape[2]))
    assert not (rescaled[:, :height, right] == image[:, :, right]).all()  # '2' and '1' instead of '1' and '0.5'
    assert (bar.slice(rescaled) == bar.slice(image)).all()


def test_tick_labels_thin_out_on_wide_matrices():
    image, layout = draw_heatmap(np.random.default_rng(0).random((24, 128)))
    assert layout.cell_w == 2 and layout.col_ticks[0] == 0
    stride = layout.col_ticks[1]
    assert stride in (5, 10, 20, 50) and layout.col_ticks == list(range(0, 128, stride))
    assert layout.row_ticks == list(range(0, 24, layout.row_ticks[1]))


def test_load_history_accumulates_windows_and_halves_when_full():
    history = LoadHistory(max_rows=4)
    loads = [np.array([float(i), 1.0]) for i in range(12)]
    gained = [history.add(step=10 * (i + 1), load=load) for i, load in enumerate(loads)]
    # windows 1-4: one row each; window 5 makes 5 rows -> halved to 2 rows of 2 windows, window 5
    # waits for window 6; windows 7-8 and 9-10 make rows 4 and 5 -> halved again (rows of 4).
    matrix, steps = history.matrix()
    assert history.windows_per_row == 4
    np.testing.assert_allclose(matrix[:, 0], [1.5, 5.5, 9.5])  # means of windows 0-3, 4-7, 8-11
    assert steps == [40, 80, 120]
    assert gained == [True] * 4 + [True, True, False, True, False, True, False, True]
    np.testing.assert_allclose(matrix[:, 1], 1.0)


def test_over_time_picture_shows_a_router_collapsing():
    windows = 6
    loads = np.full((windows, 4), 0.25)
    for t in range(windows):
        share = t / (windows - 1)  # expert 2 takes over
        loads[t] = (1 - share) / 4
        loads[t, 2] += share
    steps = [10 * (t + 1) for t in range(windows)]
    image, layout = draw_load_over_time(loads, steps, layer_id=3)
    assert (render_load_over_time(loads, steps, layer_id=3) == image).all()
    assert layout.plot.height == windows * layout.cell_h and layout.plot.width == 4 * layout.cell_w
    first = [_cell(image, layout, 0, c) for c in range(4)]
    assert len(set(first)) == 1 and first[0] == _colour(0.25)  # balanced at first; vmax = 1
    assert _cell(image, layout, windows - 1, 2) == HIGH
    assert _cell(image, layout, windows - 1, 0) == LOW


class _Capture:
    def __init__(self) -> None:
        self.images: list[tuple[int, str, np.ndarray, str]] = []

    def scalars(self, step, values): pass
    def histogram(self, step, tag, values): pass
    def text(self, tag, text): pass
    def flush(self): pass
    def close(self): pass

    def image(self, step, tag, image_chw):
        self.images.append((step, tag, image_chw, threading.current_thread().name))


def test_tracker_over_time_images_grow_and_render_on_the_writer_thread():
    stats = ExpertLoadStats(4)
    tracker = ExpertLoadTracker([stats], layer_ids=[1])
    capture = _Capture()
    logger = MetricsLogger([BackgroundSink(MetricsLogger([capture]))])
    for step, kept in zip((10, 20, 30), ([4, 4, 4, 4], [2, 2, 10, 2], [0, 0, 16, 0])):
        stats.update(torch.tensor(kept), torch.tensor(kept), 8)
        tracker.write(tracker.collect(), logger, step)
    logger.close()
    over_time = [(step, image, thread) for step, tag, image, thread in capture.images
                 if tag == "moe/layer_1/load_over_time"]
    assert [step for step, _, _ in over_time] == [10, 20, 30]
    assert all(isinstance(image, np.ndarray) and thread == "metrics-writer" for _, image, thread in over_time)
    heights = [image.shape[1] for _, image, _ in over_time]
    assert heights[0] <= heights[1] <= heights[2]  # one more row each window (32-pixel cells)
    matrix, steps = tracker.history[1].matrix()
    assert steps == [10, 20, 30] and matrix.shape == (3, 4)
    np.testing.assert_allclose(matrix[2], [0, 0, 1, 0])
    last = over_time[-1][1]
    expected, layout = draw_load_over_time(matrix, steps, layer_id=1)
    assert (last == expected).all()
    assert _cell(last, layout, 2, 2) == HIGH and _cell(last, layout, 0, 0) == _colour(0.25)


def test_a_balanced_router_sits_mid_scale():
    balanced = np.full((3, 8), 1 / 8) + np.array([[0.001], [0.0], [-0.001]]) * np.array([1, -1] * 4)
    assert load_color_max(balanced, 8) == pytest.approx(0.25)  # 2/E, not the largest entry 0.126
    image, layout = draw_load_over_time(balanced, [1, 2, 3], layer_id=0)
    assert _cell(image, layout, 1, 0) == MID
