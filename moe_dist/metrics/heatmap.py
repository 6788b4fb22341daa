"""Heat-map images with labelled axes and a colour bar, drawn with NumPy and Pillow.

Used for the expert-load images (``moe/load_heatmap``: layers x experts; and
``moe/layer_{i}/load_over_time``: logging windows x experts). matplotlib would take ~70 ms an
image; this takes a few milliseconds, which matters because the trainer renders one image per MoE
layer at every logging step.

The picture, left to right: the row axis title (rotated), row tick labels, the matrix (each cell a
block of pixels, framed), a gap, the colour bar with its tick labels. The title runs along the top,
the column tick labels and the column axis title along the bottom. :func:`draw_heatmap` also
returns where each part was drawn (:class:`HeatmapLayout`), so tests can check pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of a dark-blue -> teal -> green -> yellow ramp (RGB in [0, 1]), evenly spaced.
_RAMP = np.array([
    [0.15, 0.05, 0.35],
    [0.20, 0.30, 0.55],
    [0.15, 0.55, 0.55],
    [0.35, 0.75, 0.35],
    [0.98, 0.90, 0.15],
])
_PAD_RGB = np.array([0.5, 0.5, 0.5])  # cells of experts a layer does not have
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
_PLOT_TARGET = 256  # the matrix's longer side, in pixels, for small matrices
_MAX_CELL = 32  # no cell is larger than this (a 1 x 4 matrix stays small)
_COLORBAR_WIDTH = 12
_COLORBAR_MIN_HEIGHT = 80
_GAP = 4  # between a tick mark and its label, a label and an axis title
_TICK = 3  # tick mark length
_MARGIN = 6


@dataclass(frozen=True)
class Box:
    """A rectangle of the image in pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    def slice(self, image_chw: np.ndarray) -> np.ndarray:
        return image_chw[:, self.top: self.top + self.height, self.left: self.left + self.width]


@dataclass(frozen=True)
class HeatmapLayout:
    """Where :func:`draw_heatmap` put each part (inside the framed boxes, frames excluded)."""

    plot: Box
    """The matrix: cell (r, c) is rows ``plot.top + r*cell_h`` ..., columns ``plot.left + c*cell_w`` ..."""
    colorbar: Box
    """The colour bar: its top row is the colour of ``vmax``, its bottom row the colour of 0."""
    cell_h: int
    cell_w: int
    vmax: float
    """The value shown as the top colour (the bar's top label)."""
    row_ticks: list[int]
    """Row indices that carry a tick label."""
    col_ticks: list[int]
    """Column indices that carry a tick label."""


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] (NaN = padding) -> [3, H, W] float RGB in [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    pad = np.isnan(values)
    scaled = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(scaled).astype(int), len(_RAMP) - 2)
    frac = (scaled - low)[..., None]
    rgb = _RAMP[low] * (1.0 - frac) + _RAMP[low + 1] * frac  # [H, W, 3]
    rgb[pad] = _PAD_RGB
    return rgb.transpose(2, 0, 1)


def render_heatmap(matrix: np.ndarray, **kwargs) -> np.ndarray:
    """[rows, cols] values -> [3, H, W] uint8 image; see :func:`draw_heatmap` for the options."""
    return draw_heatmap(matrix, **kwargs)[0]


def draw_heatmap(matrix: np.ndarray, *, row_labels: Sequence[object] | None = None,
                 col_labels: Sequence[object] | None = None, row_title: str = "layer",
                 col_title: str = "expert", title: str = "", colorbar_title: str = "load",
                 vmax: float | None = None) -> tuple[np.ndarray, HeatmapLayout]:
    """Draw ``matrix`` ([rows, cols], NaN = padding, drawn grey) with axes and a colour bar.

    Colours run from 0 (dark blue) to ``vmax`` (yellow; default: the largest entry), values above
    ``vmax`` are yellow too. Row and column tick labels default to the indices; when the cells are
    too small for every label, every n-th one is shown (n = 1, 2, 5, 10, 20, 50, ...).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"heat map must be a non-empty [rows, cols] matrix (e.g. [layers, experts]), "
                         f"got shape {matrix.shape}")
    rows, cols = matrix.shape
    row_text = [str(label) for label in (row_labels if row_labels is not None else range(rows))]
    col_text = [str(label) for label in (col_labels if col_labels is not None else range(cols))]
    if len(row_text) != rows or len(col_text) != cols:
        raise ValueError(f"heat map of shape {matrix.shape} got {len(row_text)} row labels and "
                         f"{len(col_text)} column labels")
    if vmax is None or not vmax > 0:
        finite = matrix[np.isfinite(matrix)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    font = _font()
    text_h = _text_size(font, "0123456789")[1]
    cell_w = max(1, min(_MAX_CELL, _PLOT_TARGET // cols))
    cell_h = max(1, min(_MAX_CELL, _PLOT_TARGET // rows))
    plot_w, plot_h = cols * cell_w, rows * cell_h
    col_ticks = _ticks(cols, cell_w, max(_text_size(font, t)[0] for t in col_text) + 2 * _GAP)
    row_ticks = _ticks(rows, cell_h, text_h + 2)

    # Layout, in pixels.
    row_label_w = max(_text_size(font, row_text[i])[0] for i in row_ticks)
    bar_labels = [_format(v) for v in (vmax, vmax / 2, 0.0)]
    bar_label_w = max(_text_size(font, t)[0] for t in bar_labels)
    title_h = text_h + _GAP if title else 0
    bar_title_h = text_h + _GAP
    plot_top = _MARGIN + max(title_h, bar_title_h)
    plot_left = _MARGIN + text_h + _GAP + row_label_w + _GAP + _TICK + 1
    bar_h = max(plot_h, _COLORBAR_MIN_HEIGHT)
    bar_left = plot_left + plot_w + 1 + 3 * _GAP
    width = max(bar_left + _COLORBAR_WIDTH + 1 + _TICK + _GAP + max(bar_label_w, 0) + _MARGIN,
                bar_left + _text_size(font, colorbar_title)[0] + _MARGIN)
    bottom_of_axes = plot_top + plot_h + 1 + _TICK + _GAP + text_h + _GAP + text_h
    height = max(bottom_of_axes, plot_top + bar_h + 1 + text_h // 2) + _MARGIN
    plot = Box(plot_top, plot_left, plot_h, plot_w)
    bar = Box(plot_top, bar_left, bar_h, _COLORBAR_WIDTH)

    # 1. The matrix and the colour bar as pixels.
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    cells = _to_uint8(colorize(matrix / vmax))
    cells = np.repeat(np.repeat(cells, cell_h, axis=1), cell_w, axis=2)
    canvas[plot.top: plot.top + plot_h, plot.left: plot.left + plot_w] = cells.transpose(1, 2, 0)
    ramp = _to_uint8(colorize(np.linspace(1.0, 0.0, bar_h)[:, None]))  # [3, bar_h, 1], top = vmax
    canvas[bar.top: bar.top + bar_h, bar.left: bar.left + _COLORBAR_WIDTH] = ramp.transpose(1, 2, 0)

    # 2. Frames, ticks and text.
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for box in (plot, bar):
        draw.rectangle((box.left - 1, box.top - 1, box.left + box.width, box.top + box.height), outline=INK)
    below = plot.top + plot_h + 1
    for c in col_ticks:
        x = plot.left + c * cell_w + cell_w // 2
        draw.line((x, below, x, below + _TICK - 1), fill=INK)
        tw = _text_size(font, col_text[c])[0]
        draw.text((x - tw // 2, below + _TICK + _GAP // 2), col_text[c], fill=INK, font=font)
    for r in row_ticks:
        y = plot.top + r * cell_h + cell_h // 2
        draw.line((plot.left - 1 - _TICK, y, plot.left - 2, y), fill=INK)
        tw = _text_size(font, row_text[r])[0]
        draw.text((plot.left - 1 - _TICK - _GAP - tw, y - text_h // 2), row_text[r], fill=INK, font=font)
    for value_label, frac in zip(bar_labels, (0.0, 0.5, 1.0)):
        y = bar.top + round(frac * (bar_h - 1))
        x = bar.left + _COLORBAR_WIDTH + 1
        draw.line((x, y, x + _TICK - 1, y), fill=INK)
        draw.text((x + _TICK + _GAP // 2, y - text_h // 2), value_label, fill=INK, font=font)
    draw.text((bar.left, plot.top - 1 - bar_title_h), colorbar_title, fill=INK, font=font)
    if title:
        draw.text((plot.left, _MARGIN - 1), title, fill=INK, font=font)
    col_title_w = _text_size(font, col_title)[0]
    draw.text((plot.left + (plot_w - col_title_w) // 2, below + _TICK + _GAP + text_h + _GAP // 2), col_title,
              fill=INK, font=font)
    _draw_vertical_text(image, row_title, font, left=_MARGIN, center_y=plot.top + plot_h // 2)

    layout = HeatmapLayout(plot=plot, colorbar=bar, cell_h=cell_h, cell_w=cell_w, vmax=vmax,
                           row_ticks=row_ticks, col_ticks=col_ticks)
    return np.asarray(image).transpose(2, 0, 1).copy(), layout


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb * 255.0).astype(np.uint8)


def _format(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def _ticks(count: int, cell: int, label_extent: int) -> list[int]:
    """Indices that get a label: every n-th, n the smallest of 1, 2, 5, 10, 20, 50, ... that
    leaves each label ``label_extent`` pixels."""
    needed = max(1, math.ceil(label_extent / max(cell, 1)))
    magnitude = 1
    while True:
        for stride in (magnitude, 2 * magnitude, 5 * magnitude):
            if stride >= needed:
                return list(range(0, count, stride))
        magnitude *= 10


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)  # Pillow's bundled FreeType font
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: its bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - min(left, 0)), int(bottom)


def _draw_vertical_text(image: Image.Image, text: str, font, left: int, center_y: int) -> None:
    """``text`` rotated by 90 degrees (reading upwards), its left edge at ``left``."""
    tw, th = _text_size(font, text)
    strip = Image.new("L", (tw + 2, th + 2), 0)
    ImageDraw.Draw(strip).text((1, 0), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    top = max(0, center_y - strip.height // 2)
    image.paste(Image.new("RGB", strip.size, INK), (left, top), strip)
