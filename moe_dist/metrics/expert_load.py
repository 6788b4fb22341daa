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

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_dist.metrics.heatmap import HeatmapLayout, draw_heatmap, render_heatmap
from moe_dist.metrics.sink import MetricsLogger, MetricsSink
from moe_dist.moe.reduction import ReduceFn, reduce_with
from moe_dist.moe.stats import ExpertLoadStats

HEATMAP_TAG = "moe/load_heatmap"
OVER_TIME_TAG = "moe/layer_{layer}/load_over_time"
HISTORY_ROWS = 128


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
                 reduce_fn: ReduceFn | None = None, image_every: int = 1) -> None:
        if len(stats_modules) != len(layer_ids):
            raise ValueError(f"ExpertLoadTracker got {len(stats_modules)} stats modules but "
                             f"{len(layer_ids)} layer ids; pass one layer id per module")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"ExpertLoadTracker layer_ids {list(layer_ids)} repeat a layer; "
                             "each MoE layer must appear once")
        if image_every < 1:
            raise ValueError(f"ExpertLoadTracker image_every must be >= 1, got {image_every}")
        self.stats_modules = list(stats_modules)
        self.layer_ids = [int(i) for i in layer_ids]
        self.reduce_fn = reduce_fn
        self.history: dict[int, LoadHistory] = {}
        """Per layer id, the loads of the windows written so far (logging rank only)."""
        self.image_every = image_every
        """Fewest steps between two drawings of the images: drawing ~13 pictures takes tens of ms
        of the writer thread's time, and that thread shares the GIL with the training loop."""
        self._last_image_step: int | None = None
        self._gained_rows: set[int] = set()
        """Layers whose over-time picture gained a row since it was last drawn."""

    @classmethod
    def from_model(cls, model: nn.Module, reduce_fn: ReduceFn | None = None,
                   image_every: int = 1) -> ExpertLoadTracker:
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
        return cls(modules, layer_ids, reduce_fn, image_every)

    def __len__(self) -> int:
        return len(self.stats_modules)

    def collect(self) -> ExpertLoadReport:
        """Reduce, copy to host and reset the counters; see the module docstring."""
        if not self.stats_modules:
            return ExpertLoadReport(layers=[])
        stacked, widths = self.collect_on_device()
        # NOTE: device-to-host sync (once per logging window).
        return self.report_from_host(stacked.cpu().numpy(), widths)

    def collect_on_device(self) -> tuple[torch.Tensor, list[int]]:
        """Steps 1-3 of :meth:`collect`: the reduced ``[L, 2 * E_max + 1]`` counters, still on the
        device (no host sync), and each layer's expert count; :meth:`report_from_host` reads the
        tensor's host copy."""
        widths = [stats.kept.shape[0] for stats in self.stats_modules]
        width = max(widths)
        # 1. Stack into [L, 2 * width + 1]: routed | kept | tokens. A handful of kernels for any
        #    number of layers.
        def padded(name: str) -> torch.Tensor:
            rows = [getattr(stats, name).detach() for stats in self.stats_modules]
            rows = [row if row.shape[0] == width else nn.functional.pad(row, (0, width - row.shape[0]))
                    for row in rows]
            return torch.stack(rows)

        tokens = torch.stack([stats.tokens.detach().reshape(()) for stats in self.stats_modules])
        stacked = torch.cat([padded("routed"), padded("kept"), tokens[:, None]], dim=1).to(torch.float64)
        # 2. One reduction over the group.
        stacked = reduce_with(stacked, self.reduce_fn)
        # 3. Reset the device counters for the next window (the stack above is a copy).
        for stats in self.stats_modules:
            stats.reset()
        return stacked, widths

    def report_from_host(self, host: np.ndarray, widths: list[int]) -> ExpertLoadReport:
        """Step 4 of :meth:`collect`: the per-layer loads from the host copy of
        :meth:`collect_on_device`'s tensor and its expert counts."""
        width = max(widths)
        layers = [
            LayerLoad(layer_id=layer_id, routed=host[row, :experts].copy(),
                      kept=host[row, width: width + experts].copy(), tokens=float(host[row, -1]))
            for row, (layer_id, experts) in enumerate(zip(self.layer_ids, widths))
        ]
        return ExpertLoadReport(layers=layers)

    def write(self, report: ExpertLoadReport, sink: MetricsSink | MetricsLogger, step: int) -> None:
        """Log per-layer scalars and load histograms at every call; the ``moe/load_heatmap`` image
        and each layer's ``moe/layer_{i}/load_over_time`` image at the first call and then once at
        least ``image_every`` steps have passed since the last drawing (the over-time pictures
        still gain a row at every call).

        The images are handed to a :class:`MetricsLogger` as render functions, so that a logger
        over a background writer draws them on its worker thread (a few ms each)."""
        if isinstance(sink, MetricsLogger) and not sink.enabled:
            return
        scalars: dict[str, float] = {}
        draw = self._last_image_step is None or step - self._last_image_step >= self.image_every
        for layer in report.layers:
            if layer.tokens <= 0:
                continue
            prefix = f"moe/layer_{layer.layer_id}"
            scalars[f"{prefix}/imbalance"] = layer.imbalance
            scalars[f"{prefix}/drop_rate"] = layer.drop_rate
            scalars[f"{prefix}/realized_k"] = layer.realized_k
            scalars[f"{prefix}/dead_experts"] = float(layer.dead_experts)
            sink.histogram(step, f"{prefix}/load", layer.load)
            history = self.history.setdefault(layer.layer_id, LoadHistory(HISTORY_ROWS))
            if history.add(step, layer.load):
                self._gained_rows.add(layer.layer_id)
        if scalars:
            sink.scalars(step, scalars)
        if scalars and draw:
            self._last_image_step = step
            loads = report.heatmap
            layer_ids = [layer.layer_id for layer in report.layers]
            deferred = isinstance(sink, MetricsLogger)
            images = [(HEATMAP_TAG, functools.partial(render_load_heatmap, loads, layer_ids, step))]
            for layer_id in sorted(self._gained_rows):
                history = self.history[layer_id]
                matrix, steps = history.matrix()
                render = functools.partial(render_load_over_time, matrix, steps, layer_id, history.windows_per_row)
                images.append((OVER_TIME_TAG.format(layer=layer_id), render))
            self._gained_rows.clear()
            for tag, render in images:
                sink.image(step, tag, render if deferred else render())


class LoadHistory:
    """Per-window expert loads of one layer, kept in at most ``max_rows`` rows.

    Each logging window adds its load vector. While fewer than ``max_rows`` rows exist, a row is
    one window. When a row too many would exist, neighbouring rows are averaged in pairs and a row
    then holds twice as many windows, so the whole run always fits (memory O(max_rows · E)) and
    the rows stay evenly spaced in steps.
    """

    def __init__(self, max_rows: int = HISTORY_ROWS) -> None:
        if max_rows < 2:
            raise ValueError(f"LoadHistory needs max_rows >= 2, got {max_rows}")
        self.max_rows = max_rows
        self.windows_per_row = 1
        self.rows: list[np.ndarray] = []
        self.steps: list[int] = []
        """Last optimizer step of each row."""
        self._pending_sum: np.ndarray | None = None
        self._pending_windows = 0

    def add(self, step: int, load: np.ndarray) -> bool:
        """Add one window's [E] load; True when a row was completed (the picture gained a row)."""
        load = np.asarray(load, dtype=np.float64)
        self._pending_sum = load.copy() if self._pending_sum is None else self._pending_sum + load
        self._pending_windows += 1
        if self._pending_windows < self.windows_per_row:
            return False
        self.rows.append(self._pending_sum / self._pending_windows)
        self.steps.append(step)
        self._pending_sum, self._pending_windows = None, 0
        if len(self.rows) > self.max_rows:
            self._halve()
        return True

    def matrix(self) -> tuple[np.ndarray, list[int]]:
        """[rows, E] mean load of each row (a new array) and the last step of each row."""
        return np.stack(self.rows), list(self.steps)

    def _halve(self) -> None:
        odd = len(self.rows) % 2
        if odd:  # the newest row goes back to pending, as a half-full row of the doubled size
            self._pending_sum = self.rows.pop() * self.windows_per_row
            self._pending_windows = self.windows_per_row
            self.steps.pop()
        self.rows = [(a + b) / 2 for a, b in zip(self.rows[0::2], self.rows[1::2])]
        self.steps = self.steps[1::2]
        self.windows_per_row *= 2


def load_color_max(loads: np.ndarray, num_experts: int) -> float:
    """The top of the colour scale of a load picture: the largest load, but at least twice the
    uniform share 2/E, so that a balanced router sits mid-scale instead of being stretched."""
    finite = loads[np.isfinite(loads)]
    peak = float(finite.max()) if finite.size else 0.0
    return max(peak, 2.0 / max(num_experts, 1))


def render_load_heatmap(loads: np.ndarray, layer_ids: Sequence[int], step: int) -> np.ndarray:
    """The ``moe/load_heatmap`` image: layers (rows, by block index) x experts."""
    return render_heatmap(loads, row_labels=list(layer_ids), row_title="layer", col_title="expert",
                          title=f"expert load, step {step}", colorbar_title="load",
                          vmax=load_color_max(loads, loads.shape[1]))


def render_load_over_time(loads: np.ndarray, steps: Sequence[int], layer_id: int,
                          windows_per_row: int = 1) -> np.ndarray:
    """A ``moe/layer_{i}/load_over_time`` image: logging windows (rows, oldest on top, labelled
    by their last step) x experts."""
    return draw_load_over_time(loads, steps, layer_id, windows_per_row)[0]


def draw_load_over_time(loads: np.ndarray, steps: Sequence[int], layer_id: int,
                        windows_per_row: int = 1) -> tuple[np.ndarray, HeatmapLayout]:
    """:func:`render_load_over_time` and where it drew the cells and the colour bar."""
    per_row = "" if windows_per_row == 1 else f", {windows_per_row} windows a row"
    return draw_heatmap(loads, row_labels=list(steps), row_title="step", col_title="expert",
                        title=f"layer {layer_id}: expert load over time{per_row}", colorbar_title="load",
                        vmax=load_color_max(loads, loads.shape[1]))
