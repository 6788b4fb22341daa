"""Expert tensor parallelism (etp): every expert's FFN dim is split over the etp group, and the
rows each etp rank received for its experts are computed by every etp rank's shard.

:class:`EtpDispatcher` wraps the dispatcher that brings rows to this rank's experts (the ep
all-to-all, :class:`~moe_dist.moe.dispatch.all_to_all.AllToAllDispatcher`, or for ep=1 the local
one) and implements the same :class:`~moe_dist.moe.dispatch.protocol.Dispatcher` protocol, so
:class:`~moe_dist.moe.layer.MoELayer` is unchanged. It is Megatron-core's expert-TP around the
experts (all-gather before, reduce-scatter after), on the MoE view ``edp x ep x etp`` of the
ranks ("parallel folding": etp is independent of the dense tp).

Shapes: R rows from the inner dispatcher on this rank, W = etp size, L local experts,
G = rows gathered over the etp group (sum of every etp rank's R), D hidden.

Dispatch:

1. the inner dispatcher moves the tokens (ep all-to-all or local permute): ``[R, D]`` grouped
   by local expert, ``tokens_per_local_expert [L]`` (rows past their sum are padding);
2. all-gather the counts ``[L + 1]`` (the last entry: padding rows) over etp, on the device;
3. all-gather the rows over etp (:func:`~moe_dist.distributed.comms.all_gather_rows`). With
   fixed capacity every etp rank has the same R (checked once per token count), so no host sync;
   dropless, the row counts of step 2 are read to the host (``host_syncs``: one per forward) to
   size the uneven gather;
4. re-sort the gathered rows (etp-rank major) to local-expert major, padding last, so the L
   experts run one grouped GEMM over ``tokens_per_local_expert`` summed over the etp group.

Each etp rank's experts hold ``F / W`` columns of the FFN (``models/expert_parallel.apply_ep``),
so their output for a row is a partial sum. Combine un-sorts, then reduce-scatters over etp
(:func:`~moe_dist.distributed.comms.reduce_scatter_rows`): every rank gets the sum of the W
partial outputs for its own R rows, and the inner dispatcher combines them. Autograd: the
gather's backward is a reduce-scatter (a row's input gradient sums the W shards' parts), the
reduce-scatter's backward an all-gather.

Worked example, world 4, ep=2, etp=2 (MoE view: ep groups [0,2] [1,3], etp groups [0,1]
[2,3]), 4 experts: ranks 0 and 1 hold experts 0-1, FFN columns 0..F/2-1 (rank 0) and F/2..F-1
(rank 1). Rank 0's ep all-to-all brings it the rows of ranks 0 and 2 routed to experts 0-1, rank
1's those of ranks 1 and 3; the etp gather gives both ranks all four ranks' rows for experts
0-1, each computes its half of the FFN, and the reduce-scatter hands rank 0 the full outputs of
the rows it brought (which its ep all-to-all then sends back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_dist.distributed import comms
from moe_dist.moe.dispatch.all_to_all import local_expert_major_order
from moe_dist.moe.dispatch.protocol import Dispatcher


@dataclass
class EtpHandle:
    inner: Any  # the inner dispatcher's handle
    order_G: torch.Tensor  # gathered row (etp-rank major) of each local-expert-major position
    rows: list[int] | None  # rows of every etp rank (None: equal)


class EtpDispatcher:
    """Wraps ``inner`` with the etp all-gather / reduce-scatter (see the module docstring).

    ``fixed_rows``: the inner dispatcher returns the same number of rows on every etp rank for
    equal batches (fixed capacity), so the gather needs no host sync.
    """

    def __init__(self, inner: Dispatcher, etp_group: comms.ProcessGroup | None, etp_size: int,
                 fixed_rows: bool, record: comms.CollectiveRecord | None = None) -> None:
        self.inner = inner
        self.num_experts = inner.num_experts
        self.etp_group = etp_group
        self.etp_size = etp_size
        self.fixed_rows = fixed_rows
        self.record = record
        self.own_host_syncs = 0
        """Device-to-host copies made here (one per dropless dispatch)."""
        self.shape_checks = 0
        self._agreed_shapes: set[tuple[int, ...]] = set()

    @property
    def host_syncs(self) -> int:
        """Device-to-host copies on the hot path so far, the inner dispatcher's included."""
        return self.own_host_syncs + getattr(self.inner, "host_syncs", 0)

    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, valid_TK: torch.Tensor | None):
        rows_RD, tokens_L, inner_handle = self.inner.dispatch(x_TD, indices_TK, valid_TK)  # step 1
        num_rows, num_local = rows_RD.shape[0], tokens_L.numel()
        size = self.etp_size

        # Step 2: [L counts, padding rows] of every etp rank.
        counts = torch.cat([tokens_L.long(), (num_rows - tokens_L.sum()).long().reshape(1)])
        counts_WL = comms.all_gather_into_tensor(counts.new_empty(size * (num_local + 1)), counts,
                                                 self.etp_group, self.record).view(size, num_local + 1)
        # Step 3.
        if self.fixed_rows:
            self._agree_on_rows(tuple(indices_TK.shape), num_rows, rows_RD.device)
            rows, total = None, size * num_rows
        else:
            # NOTE: device-to-host sync -- sizes the uneven gather.
            rows = counts_WL.sum(1).tolist()
            self.own_host_syncs += 1
            total = sum(rows)
        gathered_GD = comms.all_gather_rows(rows_RD, rows, self.etp_group, self.record)

        # Step 4: etp-rank major -> local-expert major (padding, "expert" L, last).
        order_G = local_expert_major_order(counts_WL.flatten(), num_local + 1, total)
        expert_in = gathered_GD.index_select(0, order_G)
        tokens_per_local_expert = counts_WL[:, :num_local].sum(0)
        return expert_in, tokens_per_local_expert, EtpHandle(inner_handle, order_G, rows)

    def combine(self, y_GD: torch.Tensor, weights_TK: torch.Tensor, handle: EtpHandle) -> torch.Tensor:
        inverse_G = torch.empty_like(handle.order_G)
        inverse_G[handle.order_G] = torch.arange(handle.order_G.numel(), device=y_GD.device)
        partial_GD = y_GD.index_select(0, inverse_G)  # back to etp-rank major
        mine_RD = comms.reduce_scatter_rows(partial_GD, handle.rows, self.etp_group, self.record)
        return self.inner.combine(mine_RD, weights_TK, handle.inner)

    def _agree_on_rows(self, shape: tuple[int, ...], num_rows: int, device: torch.device) -> None:
        """The even gather needs the same row count on every etp rank; check once per token
        count (as ``AllToAllDispatcher.agree_on_capacity`` does over ep): one MAX all-reduce of
        ``[R, -R]``, read on the CPU (a ``ValueError`` on every rank), a device-side assert on CUDA."""
        if shape in self._agreed_shapes or self.etp_group is None:
            return
        bounds = num_rows * (1 - 2 * torch.arange(2, device=device))
        comms.all_reduce(bounds, "max", self.etp_group, self.record)
        self.shape_checks += 1
        message = (f"fixed-capacity expert tensor parallelism needs the same row count on every etp rank "
                   f"(this rank: {num_rows}, from {shape[0]} tokens x top_k {shape[1]}); give every rank "
                   "equal micro-batches or use moe.capacity.policy=dropless")
        if bounds.is_cuda:
            torch._assert_async(bounds[0] == -bounds[1], message)
        else:
            high, neg_low = bounds.tolist()  # a CPU tensor: no device sync
            if high != -neg_low:
                raise ValueError(f"{message}; it ranges from {-neg_low} to {high}")
        self._agreed_shapes.add(shape)
