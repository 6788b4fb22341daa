"""Expert parallelism for the research architectures' own pieces.

1. PEER (:func:`apply_peer_ep`): the expert tables ``U, V: [N, D]`` of every PEER layer are
   sharded row-wise over the ep group -- rank r keeps rows ``[r*N/P, (r+1)*N/P)`` -- and the
   layer's table lookup is replaced by :class:`ShardedTableLookup`, which fetches each retrieved
   row from its owner:

   1. sort this rank's M retrieved ids by owner ``id // (N/P)``;
   2. exchange per-owner counts (all-to-all of P ints), copy the splits to the host (one
      sync, needed to size the receive buffer);
   3. all-to-all the ids to their owners;
   4. the owner gathers its rows of U and V (one ``[R, 2D]`` buffer);
   5. all-to-all the rows back (autograd: the backward sends row gradients to the owner, whose
      embedding backward accumulates them into its shard) and undo the sort.

   Nothing N x D is materialised; per token, ``h*k`` ids travel out and ``2*h*k*D`` numbers come
   back. (Sending x to the owners instead would move less at large h*k; this keeps the PEER
   layer's math untouched, which makes the single-process model the exact reference.)

   Worked example, N=16, P=2 (rank 0 owns experts 0-7, rank 1 owns 8-15): rank 0 retrieves
   ids [9, 2, 12]; sorted by owner: [2 | 9, 12], send splits [1, 2]. Rank 1 receives [9, 12],
   gathers its local rows 1 and 4 and returns them; rank 0 un-sorts to rows for [9, 2, 12].

2. Stratified MoE (:func:`apply_stratified_agreement`): before every pass the per-stratum
   pending-token counts are MAX all-reduced over the ep group (one all-reduce of L ints), so every
   rank picks the same stratum, runs the same number of all-to-all dispatches (a rank without
   tokens in that stratum joins with zero rows) and sizes fixed capacities alike.

3. SwitchAll's sigma-MoE (:func:`apply_global_entropy`): the entropy regulariser's batch
   distribution ``p_bar = mean_t softmax(u_t)`` is taken over the tokens of every data-parallel
   rank (the paper's "global" mode). :class:`GlobalLogSumExp` reduces each layer's
   ``log sum_t softmax(u_t)`` [E] and token count over ``mesh.dp_group``: a MAX all-reduce of the
   (detached) shift, then one autograd sum all-reduce of ``[exp(l - shift), T]``. Every rank then
   computes the same loss; the sum's backward sums the ranks' identical upstream gradients, and
   the dp average of the parameter gradients turns that back into the gradient of the one global
   loss (tests/distributed/test_sigma_moe_global.py checks it against one process on the union).

   Worked example, world 4, ``dp=4, ep=2``: dp group [0,1,2,3]; each rank's 2x128 tokens give
   ``p_bar`` over all 1024 tokens, on every rank.

:func:`apply_arch_parallel` applies all three; ``parallelize`` calls it after ``apply_ep``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.distributed import comms
from moe_dist.distributed.param_tags import mark_expert_param
from moe_dist.models.hmoe_parallel import apply_hmoe_ep
from moe_dist.models.peer import PEERLayer
from moe_dist.models.stratified import StratifiedMoELayer
from moe_dist.models.switchhead import SigmaMoELayer
from moe_dist.moe.dispatch.permutation import count_per_expert

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_dist.distributed.mesh import ParallelMesh


class ShardedTableLookup:
    """Table rows by global id, each table sharded row-wise in equal contiguous blocks."""

    def __init__(self, ep_group: ProcessGroup, ep_rank: int, ep_size: int, rows_per_rank: int) -> None:
        self.ep_group = ep_group
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.rows_per_rank = rows_per_rank
        self.host_syncs = 0
        """Device-to-host copies so far (one per lookup)."""

    def __call__(self, indices_M: torch.Tensor, *tables: torch.Tensor) -> list[torch.Tensor]:
        for table in tables:
            if table.shape[0] != self.rows_per_rank:
                raise ValueError(f"sharded PEER table holds {table.shape[0]} rows, expected "
                                 f"{self.rows_per_rank} (N / parallel.ep)")
        P = self.ep_size
        # Step 1: group the ids by owner.
        owner_M = torch.div(indices_M, self.rows_per_rank, rounding_mode="floor")
        order_M = torch.argsort(owner_M, stable=True)
        send_ids = indices_M.index_select(0, order_M)
        send_counts = count_per_expert(owner_M, P)
        # Step 2: counts; NOTE: device-to-host sync (sizes the receive buffer).
        recv_counts = comms.exchange_counts(send_counts, self.ep_group)
        splits = torch.cat([send_counts, recv_counts]).tolist()
        self.host_syncs += 1
        send_splits, recv_splits = splits[:P], splits[P:]
        # Step 3: ids to their owners.
        recv_ids = send_ids.new_empty(sum(recv_splits))
        comms.all_to_all_single(recv_ids, send_ids, recv_splits, send_splits, self.ep_group)
        # Step 4: the owner's rows, all tables side by side.
        local_ids = recv_ids - self.ep_rank * self.rows_per_rank
        rows = torch.cat([F.embedding(local_ids, table) for table in tables], dim=-1)
        # Step 5: rows back to the requesting rank, in its original order.
        back = comms.AllToAll.apply(rows, send_splits, recv_splits, self.ep_group)
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        out = back.index_select(0, inverse_M)
        return list(out.split([table.shape[1] for table in tables], dim=-1))


def apply_peer_ep(model: nn.Module, mesh: ParallelMesh) -> int:
    """Shard every PEER layer's tables over ``mesh.ep_group``; returns how many layers.

    Tables are tagged as expert parameters (gradients reduced over edp, norm summed over ep)
    even when ep = 1, like ``apply_ep`` does for MoE experts.
    """
    layers = [m for m in model.modules() if isinstance(m, PEERLayer)]
    for layer in layers:
        tables = (layer.down, layer.up)
        if mesh.ep_size > 1:
            if layer.num_experts % mesh.ep_size != 0:
                raise ValueError(f"model.peer.num_experts ({layer.num_experts}) must be divisible by "
                                 f"parallel.ep ({mesh.ep_size})")
            if layer.down.weight.shape[0] != layer.num_experts:
                raise ValueError("PEER tables already sharded; apply_peer_ep must run once on a fresh model")
            rows = layer.num_experts // mesh.ep_size
            start = mesh.ep_rank * rows  # contiguous equal blocks, as DCP's Shard(0) expects
            with torch.no_grad():
                for table in tables:
                    table.weight = nn.Parameter(table.weight[start:start + rows].clone())
                    table.num_embeddings = rows
            layer.set_table_lookup(ShardedTableLookup(mesh.ep_group, mesh.ep_rank, mesh.ep_size, rows))
        start = mesh.ep_rank * layer.down.weight.shape[0] if mesh.ep_size > 1 else 0
        for table in tables:
            mark_expert_param(table.weight, offset=start)
    return len(layers)


def apply_stratified_agreement(model: nn.Module, mesh: ParallelMesh) -> int:
    """Install the per-pass MAX all-reduce over the ep group in every stratified MoE layer."""
    layers = [m for m in model.modules() if isinstance(m, StratifiedMoELayer)]
    if mesh.ep_size > 1:
        for layer in layers:
            layer.set_stratum_agreement(MaxOverGroup(mesh.ep_group))
    return len(layers)


class MaxOverGroup:
    """``agree(counts) -> elementwise max of counts over the group``, one all-reduce per call."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.calls = 0

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return comms.all_reduce(counts.clone(), "max", self.group)


class GlobalLogSumExp:
    """``(log sum_t softmax(u_t) [E], token count) -> both summed over the group``, in log space
    and autograd-correct (see item 3 of the module docstring). Two small all-reduces per call."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.calls = 0

    def __call__(self, log_sum_E: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        shift_E = comms.all_reduce(log_sum_E.detach().clone(), "max", self.group)
        local = torch.cat([(log_sum_E - shift_E).exp(), log_sum_E.new_tensor([float(num_tokens)])])
        total = comms.all_reduce_sum(local, self.group)
        return shift_E + total[:-1].log(), total[-1]


def apply_global_entropy(model: nn.Module, mesh: ParallelMesh) -> int:
    """Make every sigma-MoE layer's entropy regulariser global over ``mesh.dp_group``."""
    layers = [m for m in model.modules() if isinstance(m, SigmaMoELayer)]
    if mesh.dp_size > 1:
        for layer in layers:
            layer.entropy_reduce_fn = GlobalLogSumExp(mesh.dp_group)
    return len(layers)


def apply_arch_parallel(model: nn.Module, mesh: ParallelMesh) -> None:
    """The research architectures' parallel pieces (a no-op for the plain Transformer)."""
    apply_peer_ep(model, mesh)
    apply_stratified_agreement(model, mesh)
    apply_hmoe_ep(model, mesh)  # HMoE: experts placed by width (models/hmoe_parallel.py)
    apply_global_entropy(model, mesh)
