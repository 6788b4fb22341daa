"""Expert parallelism for a built model: shard every MoE layer's experts over the ep group and
install the all-to-all dispatcher (``moe/dispatch/all_to_all.py``).

Worked example, world 4, ``dp=4, ep=2``: ep groups [0,1] [2,3]; with 8 experts ranks 0 and 2 keep
experts 0-3, ranks 1 and 3 keep 4-7, and every token of rank 0 routed to expert 5 travels to rank 1.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.distributed import comms
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import mark_expert_param
from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moe_dist.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_ep(model: nn.Module, mesh: ParallelMesh, record: comms.CollectiveRecord | None = None) -> nn.Module:
    """Shard every MoE layer's experts over ``mesh.ep_group`` (in place) and return the model.

    Each rank keeps experts ``[ep_rank*L, (ep_rank+1)*L)`` of its (identically seeded) full
    weights, so the union over the ep group is exactly the single-process model. Expert params
    are tagged (:func:`is_expert_param`) for gradient reduction and norm clipping, even when
    ep=1 (then the dispatcher stays local). Routers, shared experts and dense layers stay
    replicated; expert-load statistics stay indexed by global expert id. ``record`` (shared by
    every dispatcher) keeps the last all-to-all's split sizes for the hang watchdog's message.
    """
    if mesh.etp_size != 1:
        raise ValueError(f"parallel.etp ({mesh.etp_size}) > 1 is not supported by apply_ep yet; use etp=1")
    for layer in moe_layers(model):
        experts = layer.experts
        for param in experts.parameters():
            mark_expert_param(param)
        if mesh.ep_size == 1:
            continue
        num_experts = layer.num_experts
        if experts.num_experts != num_experts:
            raise ValueError(f"MoE layer already sharded ({experts.num_experts} of {num_experts} experts "
                             "held); apply_ep must run once on a freshly built model")
        local = mesh.local_experts(num_experts)
        with torch.no_grad():
            experts.w13 = nn.Parameter(experts.w13[local.start:local.stop].clone())
            experts.w2 = nn.Parameter(experts.w2[local.start:local.stop].clone())
        for param in experts.parameters():
            mark_expert_param(param, offset=local.start)
        experts.num_experts = len(local)
        experts.expert_offset = local.start
        fixed = layer.cfg.capacity.policy == "fixed"
        layer.set_dispatcher(AllToAllDispatcher(num_experts, mesh.ep_group, mesh.ep_rank, mesh.ep_size,
                                                capacity_fn=layer.capacity_for if fixed else None,
                                                record=record))
        # 'dynamic' capacity: the busiest expert over the ep group (an in-place MAX all-reduce).
        layer.capacity_reduce_fn = lambda t, group=mesh.ep_group: comms.all_reduce(t, "max", group)
    return model


def host_sync_count(model: nn.Module) -> int:
    """Device-to-host syncs made by every all-to-all dispatcher of ``model`` so far."""
    return sum(getattr(layer.dispatcher, "host_syncs", 0) for layer in moe_layers(model))
