"""Expert-load monitoring: one reduce and one host copy per logging window.

Each MoE layer owns an :class:`~moe_dist.moe.stats.ExpertLoadStats` whose device buffers
(``routed[E]``, ``kept[E]``, ``tokens``) grow on every training forward without a host sync.
At a logging step the trainer calls :meth:`ExpertLoadTracker.collect` on **every rank** (it may
run a collective), then :meth:`ExpertLoadTracker.write` with its metrics logger (a no-op on
ranks that do not log).

``collect`` works in four steps:
  1. stack the counters of all layers into one ``[layers, 2 * E_max + 1]`` tensor
     (``routed | kept | tokens``, zero-padded where a layer has fewer experts);
  2. reduce it once with the injected ``reduce_fn`` (a sum over the ranks whose tokens differ;
     ``None`` in a single process);
  3. zero the device counters;
  4. copy the reduced tensor to the host once (the only sync); the per-layer metrics are then
     computed on the host.

This module imports no ``torch.distributed``: the trainer passes
``functools.partial(moe_dist.distributed.comms.all_reduce, group=...)`` or similar.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_dist.metrics.sink import MetricsLogger, MetricsSink
from moe_dist.moe.reduction import ReduceFn, reduce_with
from moe_dist.moe.stats import ExpertLoadStats

HEATMAP_TAG = "moe/load_heatmap"


@dataclass(frozen=True)
class LayerLoad:
    """Expert load of one MoE layer over one logging window (summed over the reduce group).

    A layer that saw no token in the window has NaN ratios; :meth:`ExpertLoadTracker.write`
    skips its scalars.
    """

    layer_id: int
    """Transformer block index of the layer."""
    routed: np.ndarray
    """[E] (token, expert) assignments the router made."""
    kept: np.ndarray
    """[E] assignments that survived the capacity limit (what each expert computed)."""
    tokens: float
    """Tokens the router saw."""

    @property
    def num_experts(self) -> int:
        return int(self.kept.shape[0])

    @property
    def load(self) -> np.ndarray:
        """[E] fraction of kept assignments per expert: kept / sum(kept); zeros if none."""
        total = self.kept.sum()
        return self.kept / total if total > 0 else np.zeros_like(self.kept)

    @property
    def imbalance(self) -> float:
        """max(kept) / mean(kept); 1.0 is perfectly balanced, E means one expert took all."""
        mean = self.kept.mean()
        return float(self.kept.max() / mean) if mean > 0 else float("nan")

    @property
    def drop_rate(self) -> float:
        """1 - sum(kept) / sum(routed): share of assignments dropped by the capacity limit."""
        routed = self.routed.sum()
        return float(1.0 - self.kept.sum() / routed) if routed > 0 else float("nan")

    @property
    def realized_k(self) -> float:
        """sum(kept) / tokens: experts actually computed per token (top_k minus drops)."""
        return float(self.kept.sum() / self.tokens) if self.tokens > 0 else float("nan")

    @property
    def dead_experts(self) -> int:
        """Experts that computed no token in the window."""
        return int((self.kept == 0).sum())


@dataclass(frozen=True)
class ExpertLoadReport:
    """Result of one :meth:`ExpertLoadTracker.collect`."""

    layers: list[LayerLoad]

    @property
    def heatmap(self) -> np.ndarray:
        """[layers, E_max] load fractions; NaN where a layer has fewer than E_max experts."""
        width = max((layer.num_experts for layer in self.layers), default=0)
        matrix = np.full((len(self.layers), width), np.nan)
        for row, layer in enumerate(self.layers):
            matrix[row, : layer.num_experts] = layer.load
        return matrix


class ExpertLoadTracker:
    """Owns the collection of the expert-load counters of all MoE layers of one model.

    ``stats_modules[j]`` belongs to transformer block ``layer_ids[j]``. ``reduce_fn(t)`` must
    sum ``t`` over the ranks whose routed tokens differ (in place, or returning the result);
    every rank of that group must call :meth:`collect` at the same steps.
    """

    def __init__(self, stats_modules: Sequence[ExpertLoadStats], layer_ids: Sequence[int],
                 reduce_fn: ReduceFn | None = None) -> None:
        if len(stats_modules) != len(layer_ids):
            raise ValueError(f"ExpertLoadTracker got {len(stats_modules)} stats modules but "
                             f"{len(layer_ids)} layer ids; pass one layer id per module")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"ExpertLoadTracker layer_ids {list(layer_ids)} repeat a layer; "
                             "each MoE layer must appear once")
        self.stats_modules = list(stats_modules)
        self.layer_ids = [int(i) for i in layer_ids]
        self.reduce_fn = reduce_fn

    @classmethod
    def from_model(cls, model: nn.Module, reduce_fn: ReduceFn | None = None) -> ExpertLoadTracker:
        """Finds every ExpertLoadStats in ``model``; the layer id is the first numeric
        component of its module path (``layers.3.mlp.load_stats`` -> 3)."""
        modules, layer_ids = [], []
        for name, module in model.named_modules():
            if isinstance(module, ExpertLoadStats):
                match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
                if match is None:
                    raise ValueError(f"cannot tell the layer index of expert-load stats {name!r}: "
                                     "no numeric component in its module path; build the tracker "
                                     "with explicit layer_ids")
                modules.append(module)
                layer_ids.append(int(match.group(1)))
        return cls(modules, layer_ids, reduce_fn)

    def __len__(self) -> int:
        return len(self.stats_modules)

    def collect(self) -> ExpertLoadReport:
        """Reduce, copy to host and reset the counters; see the module docstring."""
        if not self.stats_modules:
            return ExpertLoadReport(layers=[])
        widths = [stats.kept.shape[0] for stats in self.stats_modules]
        width = max(widths)
        # 1. Stack into [L, 2 * width + 1]: routed | kept | tokens. A handful of kernels for any
        #    number of layers (launch count matters: this runs right after a device sync).
        def padded(name: str) -> torch.Tensor:
            rows = [getattr(stats, name).detach() for stats in self.stats_modules]
            rows = [row if row.shape[0] == width else nn.functional.pad(row, (0, width - row.shape[0]))
                    for row in rows]
            return torch.stack(rows)

        tokens = torch.stack([stats.tokens.detach().reshape(()) for stats in self.stats_modules])
        stacked = torch.cat([padded("routed"), padded("kept"), tokens[:, None]], dim=1).to(torch.float64)
        # 2. One reduction over the group.
        stacked = reduce_with(stacked, self.reduce_fn)
        # 3. Reset the device counters for the next window (the stack above is a copy; queued
        #    before the sync so that these launches overlap the reduce).
        for stats in self.stats_modules:
            stats.reset()
        # 4. NOTE: device-to-host sync (once per logging window).
        host = stacked.cpu().numpy()
        layers = [
            LayerLoad(layer_id=layer_id, routed=host[row, :experts].copy(),
                      kept=host[row, width: width + experts].copy(), tokens=float(host[row, -1]))
            for row, (layer_id, experts) in enumerate(zip(self.layer_ids, widths))
        ]
        return ExpertLoadReport(layers=layers)

    @staticmethod
    def write(report: ExpertLoadReport, sink: MetricsSink | MetricsLogger, step: int) -> None:
        """Log per-layer scalars and load histograms and the ``moe/load_heatmap`` image."""
        if isinstance(sink, MetricsLogger) and not sink.enabled:
            return
        scalars: dict[str, float] = {}
        for layer in report.layers:
            if layer.tokens <= 0:
                continue
            prefix = f"moe/layer_{layer.layer_id}"
            scalars[f"{prefix}/imbalance"] = layer.imbalance
            scalars[f"{prefix}/drop_rate"] = layer.drop_rate
            scalars[f"{prefix}/realized_k"] = layer.realized_k
            scalars[f"{prefix}/dead_experts"] = float(layer.dead_experts)
            sink.histogram(step, f"{prefix}/load", layer.load)
        if scalars:
            sink.scalars(step, scalars)
            sink.image(step, HEATMAP_TAG, render_heatmap(report.heatmap))


# --------------------------------------------------------------------------------------------
# Heat-map rendering (no matplotlib)
# --------------------------------------------------------------------------------------------

# Anchors of a dark-blue -> teal -> green -> yellow ramp (RGB in [0, 1]), evenly spaced.
_RAMP = np.array([
    [0.15, 0.05, 0.35],
    [0.20, 0.30, 0.55],
    [0.15, 0.55, 0.55],
    [0.35, 0.75, 0.35],
    [0.98, 0.90, 0.15],
])
_PAD_RGB = np.array([0.5, 0.5, 0.5])  # cells of experts a layer does not have
_TARGET_PIXELS = 256  # the longer side of the image, at most, for small matrices


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


def render_heatmap(matrix: np.ndarray) -> np.ndarray:
    """[layers, experts] loads -> [3, H, W] uint8 image, rows = layers, columns = experts.

    Values are divided by the largest entry (the busiest expert is the brightest colour), NaN
    padding is grey, and each cell becomes a square block of pixels so that an 8 x 16 matrix
    is not a 16-pixel-wide smudge.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"heat map must be a non-empty [layers, experts] matrix, got shape {matrix.shape}")
    peak = np.nanmax(matrix) if not np.all(np.isnan(matrix)) else 0.0
    normalised = matrix / peak if peak > 0 else np.where(np.isnan(matrix), np.nan, 0.0)
    rgb = colorize(normalised)
    cell = max(1, _TARGET_PIXELS // max(matrix.shape))
    rgb = np.repeat(np.repeat(rgb, cell, axis=1), cell, axis=2)
    return np.round(rgb * 255.0).astype(np.uint8)
