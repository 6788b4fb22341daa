"""Routing state that lives across steps, and what the trainer logs about it.

After every optimizer step, every trainer plan calls :func:`update_selection_bias_from_stats`
with the sum over token ranks: it updates the auxiliary-loss-free selection biases, then
(:func:`update_after_step`) the capacity controllers and the DynMoE active sets, all from
all-reduced counts, so every rank stays identical.

For logging, :func:`routing_metrics` returns per-layer scalars and histograms (one reduction of
the per-rank experts-per-token counters for the whole model) and resets the counters;
:func:`write_routing_metrics` sends them to a metrics sink. Keys, with ``i`` the block index:

- ``moe/layer_{i}/experts_per_token`` (mean realised k) and the histogram
  ``moe/layer_{i}/experts_per_token_hist`` (variable-k routers and 'top_any');
- ``moe/layer_{i}/unrouted_frac`` ('top_any': share of tokens that activated no expert);
- ``moe/layer_{i}/active_experts``, ``threshold_mean|min|max`` and the histogram
  ``moe/layer_{i}/thresholds`` ('top_any');
- ``moe/layer_{i}/capacity_factor``, ``capacity``, ``capacity_drop_rate`` ('dynamic'/'controller').
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from moe_dist.moe import capacity_dynamic
from moe_dist.moe.reduction import ReduceFn, reduce_with
from moe_dist.moe.routing import adaptive
from moe_dist.moe.routing.balance import update_selection_bias



@torch.no_grad()
def update_selection_bias_from_stats(model: nn.Module, reduce_fn: ReduceFn | None = None) -> None:
    """After an optimizer step: update every router's selection bias from the step's counts.

    ``reduce_fn`` sums a tensor over every rank that routes different tokens with the same
    router (None in a single process). All routers' counts travel in one reduction. The other
    cross-step routing state (capacity controllers, DynMoE active sets) is updated here too,
    from the same reduction function (:func:`update_after_step`).
    """
    routers = [m for m in model.modules()
               if hasattr(m, "step_counts") and getattr(m, "cfg", None) is not None
               and getattr(m.cfg, "bias_update_rate", 0) > 0]
    if routers:
        counts = torch.stack([r.step_counts for r in routers])
        counts = reduce_with(counts, reduce_fn)
        for router, router_counts in zip(routers, counts):
            update_selection_bias(router.expert_bias, router_counts, router.cfg.bias_update_rate)
            router.step_counts.zero_()
    update_after_step(model, reduce_fn)


@torch.no_grad()
def update_after_step(model: nn.Module, reduce_fn: ReduceFn | None = None) -> None:
    """Capacity controllers, then DynMoE growth/pruning (see the module docstring)."""
    capacity_dynamic.update_capacity_states(model, reduce_fn)
    adaptive.update_adaptive_experts(model, reduce_fn)


def _numbered_moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(block index, layer) for every MoE layer; the index is the first number in the module
    path (``layers.3.mlp`` -> 3), as the expert-load tracker numbers layers. Works for a model
    wrapped by an engine too."""
    found = []
    for position, (name, module) in enumerate(
            (n, m) for n, m in model.named_modules() if hasattr(m, "capacity_state")):
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        found.append((int(match.group(1)) if match else position, module))
    return found


@torch.no_grad()
def routing_metrics(model: nn.Module, reduce_fn: ReduceFn | None = None,
                    reset: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, histograms) for every MoE layer; collective when ``reduce_fn`` is given (call
    it on every rank). Histograms are arrays of samples (bin index repeated by its count)."""
    layers = _numbered_moe_layers(model)
    hist_layers = [(i, layer) for i, layer in layers if hasattr(layer.router, "k_hist")]
    scalars: dict[str, float] = {}
    hists: dict[str, np.ndarray] = {}
    if hist_layers:
        flat = torch.cat([layer.router.k_hist for _, layer in hist_layers])
        flat = reduce_with(flat.clone(), reduce_fn)
        host = flat.cpu().numpy()  # NOTE: device-to-host sync (logging steps only)
        offset = 0
        for i, layer in hist_layers:
            size = layer.router.k_hist.numel()
            counts = host[offset:offset + size]
            offset += size
            tokens = counts.sum()
            if tokens > 0:
                prefix = f"moe/layer_{i}"
                bins = np.arange(size)
                scalars[f"{prefix}/experts_per_token"] = float((bins * counts).sum() / tokens)
                hists[f"{prefix}/experts_per_token_hist"] = np.repeat(bins, counts.astype(np.int64))
                if isinstance(layer.router, adaptive.TopAnyRouter):
                    scalars[f"{prefix}/unrouted_frac"] = float(counts[0] / tokens)
            if reset:
                layer.router.k_hist.zero_()
    for i, layer in layers:
        prefix = f"moe/layer_{i}"
        router = layer.router
        if isinstance(router, adaptive.TopAnyRouter):
            active = router.active
            # NOTE: device-to-host sync (logging steps only)
            thresholds = router.threshold.detach()[active].float().cpu().numpy()
            scalars[f"{prefix}/active_experts"] = float(active.sum())
            if thresholds.size:
                scalars[f"{prefix}/threshold_mean"] = float(thresholds.mean())
                scalars[f"{prefix}/threshold_min"] = float(thresholds.min())
                scalars[f"{prefix}/threshold_max"] = float(thresholds.max())
                hists[f"{prefix}/thresholds"] = thresholds
        state = getattr(layer, "capacity_state", None)
        if state is not None:
            scalars.update(capacity_dynamic.capacity_metrics(state, prefix))
    return scalars, hists


def write_routing_metrics(model: nn.Module, sink, step: int, reduce_fn: ReduceFn | None = None) -> None:
    """Log :func:`routing_metrics` to a ``MetricsSink`` (scalars and histograms)."""
    scalars, hists = routing_metrics(model, reduce_fn)
    if scalars:
        sink.scalars(step, scalars)
    for tag, values in hists.items():
        if values.size:
            sink.histogram(step, tag, values)
