"""Expert parallelism for a built model: shard every MoE layer's experts over the ep group (and
each expert's FFN over the etp group) and install the dispatcher that brings the rows to them:
the all-to-all (``moe/dispatch/all_to_all.py``), wrapped by the etp gather / reduce-scatter
(``moe/dispatch/etp.py``) when ``etp > 1``.

Worked example, world 4, ``dp=4, ep=2``: ep groups [0,1] [2,3]; with 8 experts ranks 0 and 2 keep
experts 0-3, ranks 1 and 3 keep 4-7, and every token of rank 0 routed to expert 5 travels to rank 1.

With ``ep=2, etp=2`` on the same 4 ranks (MoE view: ep groups [0,2] [1,3], etp groups [0,1]
[2,3]), ranks 0 and 1 keep experts 0-3 and ranks 2 and 3 experts 4-7; of each expert's FFN dim F,
ranks 0 and 2 keep columns [0, F/2) of the gate and of the up projection (``w13 [4, D, F]``) and
rows [0, F/2) of ``w2``, ranks 1 and 3 the other halves.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.distributed import comms
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import mark_etp_shard, mark_expert_param, take_etp_shard
from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moe_dist.moe.dispatch.etp import EtpDispatcher
from moe_dist.moe.dispatch.local import LocalDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer

W13_PARTS = 2
"""SwiGLU ``w13``'s last dim is the gate and the up projection fused: each is split over etp
alone. ReLU experts fuse one part (:attr:`GroupedExperts.fused_parts`)."""


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_ep(model: nn.Module, mesh: ParallelMesh, record: comms.CollectiveRecord | None = None) -> nn.Module:
    """Shard every MoE layer's experts over ``mesh.ep_group`` and their FFN dim over
    ``mesh.etp_group`` (in place) and return the model.

    Each rank keeps experts ``[ep_rank*L, (ep_rank+1)*L)`` of its (identically seeded) full
    weights and, with etp > 1, etp block ``etp_rank`` of the gate, the up projection and ``w2``'s
    rows (:func:`~moe_dist.distributed.param_tags.take_etp_shard`), so the union over the ep x etp
    block is exactly the single-process model. Expert params are tagged (:func:`is_expert_param`,
    and ``etp_shard`` with etp > 1) for gradient reduction, norm clipping and checkpoints, even
    when ep=1 (then the dispatcher stays local). Routers, shared experts and dense layers stay
    replicated; expert-load statistics stay indexed by global expert id. ``record`` (shared by
    every dispatcher) keeps the last collective's split sizes for the hang watchdog's message.
    """
    for layer in moe_layers(model):
        experts = layer.experts
        for param in experts.parameters():
            mark_expert_param(param)
        if mesh.ep_size == 1 and mesh.etp_size == 1:
            continue
        num_experts = layer.num_experts
        if experts.num_experts != num_experts or experts.ffn_dim != layer.expert_ffn_dim:
            raise ValueError(f"MoE layer already sharded ({experts.num_experts} of {num_experts} experts, "
                             f"FFN {experts.ffn_dim} of {layer.expert_ffn_dim} held); apply_ep must run "
                             "once on a freshly built model")
        local = mesh.local_experts(num_experts)
        _shard_experts(experts, local, mesh)
        fixed = layer.cfg.capacity.policy == "fixed"
        capacity_fn = layer.capacity_for if fixed else None
        if mesh.ep_size > 1:
            inner = AllToAllDispatcher(num_experts, mesh.ep_group, mesh.ep_rank, mesh.ep_size,
                                       capacity_fn=capacity_fn, record=record)
            # 'dynamic' capacity: the busiest expert over the ep group (an in-place MAX all-reduce).
            layer.capacity_reduce_fn = lambda t, group=mesh.ep_group: comms.all_reduce(t, "max", group)
        elif fixed:
            # ep=1, etp>1, fixed capacity: the same C rows per expert on every etp rank, so the
            # etp gather is even and sync-free (the all-to-all without a group is local).
            inner = AllToAllDispatcher(num_experts, None, 0, 1, capacity_fn=capacity_fn, record=record)
        else:
            inner = LocalDispatcher(num_experts)
        if mesh.etp_size > 1:
            inner = EtpDispatcher(inner, mesh.etp_group, mesh.etp_size, fixed_rows=fixed, record=record)
        layer.set_dispatcher(inner)
    return model


def _shard_experts(experts: GroupedExperts, local: range, mesh: ParallelMesh) -> None:
    """Keep experts ``local`` and, with etp > 1, this etp rank's FFN block of each."""
    rank, size = mesh.etp_rank, mesh.etp_size
    if experts.ffn_dim % size != 0:
        raise ValueError(f"the experts' FFN dim ({experts.ffn_dim}) must be divisible by parallel.etp ({size})")
    with torch.no_grad():
        w13 = experts.w13[local.start:local.stop]
        w2 = experts.w2[local.start:local.stop]
        if size > 1:
            w13 = take_etp_shard(w13, 2, experts.fused_parts, rank, size)
            w2 = take_etp_shard(w2, 1, 1, rank, size)
        experts.w13 = nn.Parameter(w13.clone())
        experts.w2 = nn.Parameter(w2.clone())
    for param in experts.parameters():
        mark_expert_param(param, offset=local.start)
    if size > 1:
        mark_etp_shard(experts.w13, 2, experts.fused_parts, rank, size)
        mark_etp_shard(experts.w2, 1, 1, rank, size)
    experts.num_experts = len(local)
    experts.expert_offset = local.start
    experts.ffn_dim //= size


def host_sync_count(model: nn.Module) -> int:
    """Device-to-host syncs made by every all-to-all dispatcher of ``model`` so far."""
    return sum(getattr(layer.dispatcher, "host_syncs", 0) for layer in moe_layers(model))
