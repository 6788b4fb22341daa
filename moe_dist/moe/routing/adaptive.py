"""DynMoE adaptive expert count inside a fixed pool of expert slots (``moe.router.adaptive``).

``moe.num_experts`` is the pool: every slot's expert weights exist from the start (sharded over
the ep group as usual), and the 'top_any' router's ``active`` mask says which slots take tokens.
Growing and pruning only flip that mask, so shapes, shards and process groups never change.

Schedule, per layer, counted in optimizer steps (``TopAnyRouter.adaptive_step``):

1. during the last ``record_steps`` steps before each multiple of ``update_every`` the router
   records, per slot, the tokens it received, and the sum and number of the tokens that
   activated no expert (before the fallback);
2. after the step that completes the window, :func:`update_adaptive_experts`
   a. sums the records over every rank that routes different tokens with this router (one
      reduction for all layers), so every rank takes the same decisions;
   b. removes active slots that received no token for ``prune_after`` consecutive windows
      (never the last active slot);
   c. if some token activated nothing and fewer than ``max_experts`` slots are active, activates
      the first inactive slot with gate embedding ``sum(unrouted x) / ||sum(unrouted x)||`` and
      threshold 0 (DynMoE's initialisation); its expert FFN keeps its current weights;
   d. clears the records and lists the changed slots in ``router.pending_resets``.
3. the trainer then calls :func:`reset_pending_optimizer_state` so that a new or removed slot
   starts from zero Adam moments (gate row, threshold and, on the owning ep rank, the expert).

The active set and the records are buffers, so checkpoints save and restore them.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.moe.reduction import ReduceFn, reduce_with
from moe_dist.moe.routing.top_any import TopAnyRouter



def adaptive_layers(model: nn.Module) -> list[nn.Module]:
    """MoE layers whose router grows and prunes experts."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "router", None), TopAnyRouter) and m.router.cfg.adaptive.enabled]


@torch.no_grad()
def update_adaptive_experts(model: nn.Module, reduce_fn: ReduceFn | None = None) -> dict[int, list[int]]:
    """End of an optimizer step (see the module docstring). Returns {layer position: changed
    slots} for the layers that took a decision this step."""
    layers = adaptive_layers(model)
    due: list[tuple[int, TopAnyRouter]] = []
    for position, layer in enumerate(layers):
        router: TopAnyRouter = layer.router
        step = router.host_step + 1
        router.adaptive_step += 1
        router._host_step = step
        if router.host_step % router.cfg.adaptive.update_every == 0:
            due.append((position, router))
    if not due:
        return {}

    # a. One reduction for every due layer: [counts E | unrouted sum D | unrouted tokens 1].
    flat = torch.cat([torch.cat([r.record_counts, r.record_unrouted_sum, r.record_unrouted.view(1)])
                      for _, r in due])
    flat = reduce_with(flat, reduce_fn)
    changes: dict[int, list[int]] = {}
    offset = 0
    for position, router in due:
        num_experts, dim = router.num_experts, router.record_unrouted_sum.numel()
        counts = flat[offset:offset + num_experts]
        unrouted_sum = flat[offset + num_experts:offset + num_experts + dim]
        unrouted = flat[offset + num_experts + dim]
        offset += num_experts + dim + 1
        changes[position] = decide(router, counts, unrouted_sum, unrouted)
    return changes


@torch.no_grad()
def decide(router: TopAnyRouter, counts_E: torch.Tensor, unrouted_sum_D: torch.Tensor,
           unrouted: torch.Tensor) -> list[int]:
    """Steps b-d for one router from already reduced records; returns the changed slots."""
    cfg = router.cfg.adaptive
    # NOTE: device-to-host sync (once per update window): the decisions are host control flow.
    active = router.active.tolist()
    idle = torch.where((counts_E == 0) & router.active, router.idle_windows + 1, 0)
    router.idle_windows.copy_(idle)
    idle_host = idle.tolist()
    changed: list[int] = []

    if cfg.prune_after > 0:
        doomed = [e for e, on in enumerate(active) if on and idle_host[e] >= cfg.prune_after]
        if len(doomed) < sum(active):  # never switch off the last active slot
            for e in doomed:
                active[e] = False
                changed.append(e)

    max_active = cfg.max_experts or router.num_experts
    if float(unrouted) > 0 and sum(active) < max_active and not all(active):
        slot = active.index(False)
        active[slot] = True
        direction = unrouted_sum_D / unrouted_sum_D.norm().clamp_min(1e-12)
        router.weight[slot].copy_(direction.to(router.weight.dtype))
        router.threshold[slot].zero_()
        router.idle_windows[slot] = 0
        if slot not in changed:
            changed.append(slot)

    router.active.copy_(torch.tensor(active, device=router.active.device))
    router.record_counts.zero_()
    router.record_unrouted_sum.zero_()
    router.record_unrouted.zero_()
    router.pending_resets = sorted(changed)
    return router.pending_resets


def _zero_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, row: int) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[row].zero_()


@torch.no_grad()
def reset_slot_optimizer_state(optimizer: torch.optim.Optimizer, layer: nn.Module, slot: int) -> None:
    """Zero every per-element optimizer state (Adam moments) of expert slot ``slot``: its gate
    row, its threshold and, where this rank holds it, its expert weights.

    The per-parameter step count is shared by all rows and stays; Adam's bias correction is
    then already ~1, so the slot's first updates are ~lr * g / (|g| + eps) like any other row.
    """
    router = layer.router
    _zero_rows(optimizer, router.weight, slot)
    _zero_rows(optimizer, router.threshold, slot)
    experts = layer.experts
    local = slot - experts.expert_offset
    if 0 <= local < experts.num_experts:
        for param in experts.parameters():
            _zero_rows(optimizer, param, local)


def reset_pending_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[int, int]]:
    """Reset the optimizer state of every slot changed by the last update (call after
    :func:`update_adaptive_experts`, on every rank). Returns (layer position, slot) pairs."""
    done = []
    for position, layer in enumerate(adaptive_layers(model)):
        for slot in layer.router.pending_resets:
            reset_slot_optimizer_state(optimizer, layer, slot)
            done.append((position, slot))
        layer.router.pending_resets = []
    return done
