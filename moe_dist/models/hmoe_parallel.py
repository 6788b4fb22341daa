"""Expert parallelism for HMoE (``models/hmoe.py``): experts placed by width, rows sent to owners.

:func:`apply_hmoe_ep` places every HMoE layer's experts with
:func:`~moe_dist.models.hmoe.place_experts` (balanced summed widths, so balanced FLOPs at uniform
routing; the counts may differ), drops the experts this rank does not own and installs
:class:`WidthPlacedExchange`, which per forward:

1. sorts this rank's N routed rows by owner rank;
2. exchanges per-owner row counts (all-to-all of P ints) and copies them to the host (one sync,
   sizes the receive buffers);
3. all-to-alls the expert ids and the rows (autograd) to their owners;
4. the owner computes its experts (``HMoELayer.run_local``: grouped GEMMs by width);
5. all-to-alls the outputs back (autograd) and undoes the sort.

Worked example, widths [16, 32, 64, 128], ep 2: rank 0 owns expert 3, rank 1 experts 0-2; a row of
rank 0 routed to expert 1 travels to rank 1 and its output comes back.

Parameters keep their single-process names (``...experts.<global id>.w13``): a rank holds a
subset, tagged as expert parameters (gradients reduced over edp, norm summed over ep).
They are tagged whole experts (``mark_whole_expert``): a checkpoint holds every expert under its
single-process name, written by its owner, so the saved layout does not depend on ep and a run
resumes at another ep (each rank reads the experts it owns there; ``HMoELayer.
state_names_elsewhere`` names the rest so the load check accepts them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_dist.distributed import comms
from moe_dist.distributed.param_tags import mark_whole_expert
from moe_dist.models.hmoe import HMoELayer, place_experts
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.experts import to_autocast_dtype

if TYPE_CHECKING:
    from moe_dist.distributed.mesh import ParallelMesh


class WidthPlacedExchange:
    """``exchange(layer, x_ND, eid_N) -> y_ND``: each row computed by its expert's owner rank."""

    def __init__(self, placement: list[list[int]], ep_group: object, ep_rank: int) -> None:
        self.placement = placement
        self.ep_group = ep_group  # a ProcessGroup (comms.py takes it; models import no torch.distributed)
        self.ep_rank = ep_rank
        owner = {e: r for r, ids in enumerate(placement) for e in ids}
        self.owner_of = torch.tensor([owner[e] for e in range(len(owner))])
        self.host_syncs = 0

    def __call__(self, layer: HMoELayer, x_ND: torch.Tensor, eid_N: torch.Tensor) -> torch.Tensor:
        P = len(self.placement)
        # Step 1: rows by owner.
        owner_N = self.owner_of.to(eid_N.device)[eid_N]
        order = torch.argsort(owner_N, stable=True)
        send_counts = count_per_expert(owner_N, P)
        # Step 2: counts; NOTE: device-to-host sync (sizes the receive buffers).
        recv_counts = comms.exchange_counts(send_counts, self.ep_group)
        splits = torch.cat([send_counts, recv_counts]).tolist()
        self.host_syncs += 1
        send_splits, recv_splits = splits[:P], splits[P:]
        # Step 3: ids and rows to the owners.
        send_ids = eid_N.index_select(0, order)
        recv_ids = send_ids.new_empty(sum(recv_splits))
        comms.all_to_all_single(recv_ids, send_ids, recv_splits, send_splits, self.ep_group)
        # Rows travel in the autocast dtype (half the bytes of an fp32 residual stream on CUDA).
        send_x = to_autocast_dtype(x_ND).index_select(0, order)
        recv_x = comms.AllToAll.apply(send_x, recv_splits, send_splits, self.ep_group)
        # Step 4: the owner's experts.
        y = layer.run_local(recv_x, recv_ids)
        # Step 5: outputs back, original order.
        back = comms.AllToAll.apply(y, send_splits, recv_splits, self.ep_group)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return back.index_select(0, inverse)


def apply_hmoe_ep(model: nn.Module, mesh: ParallelMesh) -> int:
    """Place and shard every HMoE layer's experts over ``mesh.ep_group``; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, HMoELayer)]
    for layer in layers:
        if mesh.ep_size > 1:
            if mesh.etp_size > 1:
                raise ValueError("model.arch=hmoe does not support parallel.etp > 1")
            if len(layer.experts) != layer.num_experts:
                raise ValueError("HMoE experts already placed; apply_hmoe_ep must run once on a fresh model")
            placement = place_experts(layer.widths, mesh.ep_size)
            keep = set(placement[mesh.ep_rank])
            for e in range(layer.num_experts):
                if e not in keep:
                    del layer.experts[str(e)]
            layer.exchange = WidthPlacedExchange(placement, mesh.ep_group, mesh.ep_rank)
        for param in layer.experts.parameters():
            mark_whole_expert(param)
    return len(layers)
