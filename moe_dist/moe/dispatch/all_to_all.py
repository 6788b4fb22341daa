"""All-to-all token dispatch over an expert-parallel group.

:class:`AllToAllDispatcher` implements the :class:`~moe_dist.moe.dispatch.protocol.Dispatcher`
protocol (``dispatch`` -> experts -> ``combine``), so :class:`~moe_dist.moe.layer.MoELayer` runs
unchanged whether its experts are local or sharded; ``models/expert_parallel.apply_ep`` slices
the expert weights and installs it.

Shapes: T local tokens, K slots, N = T*K assignments, D hidden, E global experts,
P = ep_size ranks, L = E / P local experts, C per-expert capacity, R received rows.

Under CUDA autocast the rows are cast to the autocast dtype before anything else, as
:class:`~moe_dist.moe.dispatch.local.LocalDispatcher` does: an fp32 residual stream then sends
bf16 rows over the wire (half the bytes) and the experts get the dtype their grouped GEMM needs.

Dropless dispatch (splits depend on the routing):

1. permute the local assignments by global expert id (invalid/dropped ones sort last under a
   sentinel id and are not sent);
2. exchange per-expert counts with one all-to-all of E ints on device;
3. copy the per-rank send/receive row counts to the host -- the only host sync, needed to size
   the receive buffer (counted in ``host_syncs``);
4. all-to-all the token rows with uneven splits (autograd: the backward swaps the splits);
5. the received rows are grouped by (source rank, local expert); re-sort them to local-expert
   major order so the L local experts run as one grouped GEMM over ``tokens_per_local_expert``.

Capacity-bounded dispatch (``capacity_fn`` returns C): every source rank sends exactly C rows per
expert (zero rows where the expert got fewer), so every split is ``L*C`` and known without any
sync (none on the GPU, proven by ``tests/gpu/test_host_syncs_gpu.py``); the receive buffer
[P, L, C, D] is transposed to [L, P, C, D] and each local expert
computes P*C rows (the zero padding rows give zero outputs and zero weight gradients, and are
never gathered back). Combine inverts each step: re-sort back, all-to-all back, un-permute with
the combine weights.

Worked example, E=4, P=2 (rank 0 holds experts 0,1; rank 1 holds 2,3), dropless: rank 0 routes
counts [3,0,1,2] and rank 1 routes [1,1,0,4]. Rank 0 sends 3 rows (experts 0,1) to itself and 3
rows to rank 1; it receives [3,0] from itself and [1,1] from rank 1, i.e. rows ordered
(src0:e0 x3, src1:e0 x1, src1:e1 x1) -> re-sorted to (e0: src0 x3, src1 x1; e1: src1 x1),
``tokens_per_local_expert = [4, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe_dist.distributed import comms
from moe_dist.moe.dispatch.permutation import PermuteState, permute, stable_argsort_small, unpermute
from moe_dist.moe.experts import to_autocast_dtype

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

CapacityFn = Callable[[int, int], "int | None"]


@dataclass
class AllToAllHandle:
    """What :meth:`AllToAllDispatcher.combine` needs to undo :meth:`AllToAllDispatcher.dispatch`."""

    permute_state: PermuteState
    num_sorted_rows: int  # N: rows of the locally permuted buffer (sent + not sent)
    send_splits: list[int] | None  # rows sent to each ep rank (dropless)
    recv_splits: list[int] | None  # rows received from each ep rank (dropless)
    local_order_R: torch.Tensor | None  # received row -> local-expert-major position (dropless)
    slot_of_row_N: torch.Tensor | None  # sorted row -> slot e*C+c of the send buffer (capacity)
    capacity: int | None


class AllToAllDispatcher:
    """Token dispatch over an expert-parallel group (see the module docstring for the steps).

    ``capacity_fn(num_tokens, top_k)`` (the layer's ``capacity_for``) selects the fixed-shape
    path when it returns an int; ``None`` or a ``None`` result selects the dropless path.
    """

    def __init__(self, num_experts: int, ep_group: ProcessGroup | None, ep_rank: int, ep_size: int,
                 capacity_fn: CapacityFn | None = None,
                 record: comms.CollectiveRecord | None = None) -> None:
        if num_experts % ep_size != 0:
            raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by parallel.ep "
                             f"({ep_size}); use ep in {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep_size={ep_size})")
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.capacity_fn = capacity_fn
        self.record = record
        """Caller-owned note of the last collective (with split sizes) for hang messages."""
        self.host_syncs = 0
        """Device-to-host copies on the hot path so far (one per dropless dispatch); read by benchmarks."""
        self.shape_checks = 0
        """One-time agreements on a new token count in capacity mode (each one small all-reduce;
        a host read on CPU, a device-side assert without host sync on CUDA)."""
        self._agreed_shapes: set[tuple[int, int]] = set()

    # dispatch ---------------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, valid_TK: torch.Tensor | None):
        # Under CUDA autocast, the rows travel in the autocast dtype (as in LocalDispatcher).
        x_TD = to_autocast_dtype(x_TD)
        x_sorted_ND, tokens_per_expert_E, state = permute(x_TD, indices_TK, self.num_experts, valid_TK)
        num_tokens, top_k = indices_TK.shape
        capacity = self.capacity_fn(num_tokens, top_k) if self.capacity_fn is not None else None
        if capacity is None:
            return self._dispatch_dropless(x_sorted_ND, tokens_per_expert_E, state)
        self.agree_on_capacity(num_tokens, top_k, capacity, x_TD.device)
        return self._dispatch_capacity(x_sorted_ND, tokens_per_expert_E, state, capacity)

    def agree_on_capacity(self, num_tokens: int, top_k: int, capacity: int, device: torch.device) -> None:
        """Static splits need the same capacity on every ep rank; check once per token count, so
        that unequal micro-batches fail instead of running a mismatched all-to-all.

        One small MAX all-reduce of ``[C, -C]`` per new ``(num_tokens, top_k)``. On the CPU the
        result is read on the host (free there) and a mismatch raises ``ValueError`` on every
        rank. On CUDA it is checked by a device-side assert queued before the first all-to-all,
        with no host read (so the capacity path stays sync-free even on a new shape, e.g. under
        CUDA-graph capture): a mismatch stops every rank with "device-side assert triggered"
        (the same configuration on the CPU raises the ``ValueError`` that names both capacities).
        """
        if (num_tokens, top_k) in self._agreed_shapes or self.ep_group is None:
            return
        # [C, -C] made on the device (no host-to-device copy, which would sync on CUDA).
        bounds = capacity * (1 - 2 * torch.arange(2, device=device))
        comms.all_reduce(bounds, "max", self.ep_group, self.record)
        self.shape_checks += 1
        mine = f"this rank: {capacity}, from {num_tokens} tokens x top_k {top_k}"
        fix = "give every rank equal micro-batches or use moe.capacity.policy=dropless"
        if bounds.is_cuda:
            torch._assert_async(bounds[0] == -bounds[1],
                                f"fixed-capacity dispatch needs the same per-expert capacity on every "
                                f"ep rank ({mine}); {fix}")
        else:
            high, neg_low = bounds.tolist()  # a CPU tensor: no device sync
            if high != -neg_low:
                raise ValueError(f"fixed-capacity dispatch needs the same per-expert capacity on every ep rank, "
                                 f"but it ranges from {-neg_low} to {high} ({mine}); {fix}")
        self._agreed_shapes.add((num_tokens, top_k))

    def _dispatch_dropless(self, x_sorted_ND, tokens_per_expert_E, state):
        P, L = self.ep_size, self.num_local_experts
        # Step 2: recv_counts[s*L + l] = rows source rank s sends to my local expert l.
        recv_counts_E = comms.exchange_counts(tokens_per_expert_E, self.ep_group, self.record)
        send_per_rank = tokens_per_expert_E.view(P, L).sum(1)
        recv_per_rank = recv_counts_E.view(P, L).sum(1)
        # Step 3. NOTE: device-to-host sync -- sizes the receive buffer of the uneven all-to-all.
        splits = torch.cat([send_per_rank, recv_per_rank]).tolist()
        self.host_syncs += 1
        send_splits, recv_splits = splits[:P], splits[P:]
        num_recv = sum(recv_splits)

        # Step 4: valid rows are the first sum(send_splits) sorted rows, already grouped by rank.
        x_send = x_sorted_ND[:sum(send_splits)]
        x_recv_RD = comms.AllToAll.apply(x_send, recv_splits, send_splits, self.ep_group, self.record)

        # Step 5: (source, local expert) order -> local-expert-major order.
        local_order_R = local_expert_major_order(recv_counts_E, L, num_recv)
        expert_in = x_recv_RD.index_select(0, local_order_R)
        tokens_per_local_expert = recv_counts_E.view(P, L).sum(0)
        handle = AllToAllHandle(state, x_sorted_ND.shape[0], send_splits, recv_splits, local_order_R,
                                None, None)
        return expert_in, tokens_per_local_expert, handle

    def _dispatch_capacity(self, x_sorted_ND, tokens_per_expert_E, state, capacity: int):
        P, L, C = self.ep_size, self.num_local_experts, capacity
        num_rows, dim = x_sorted_ND.shape
        device = x_sorted_ND.device
        src_row_EC, slot_of_row_N = capacity_slots(tokens_per_expert_E, C, num_rows)
        x_ext = torch.cat([x_sorted_ND, x_sorted_ND.new_zeros(1, dim)])  # row num_rows reads zeros
        x_send = x_ext.index_select(0, src_row_EC.reshape(-1))  # [E*C, D], rank-major already
        splits = [L * C] * P
        x_recv = comms.AllToAll.apply(x_send, splits, splits, self.ep_group, self.record)  # [P*L*C, D]
        expert_in = x_recv.view(P, L, C, dim).transpose(0, 1).reshape(L * P * C, dim)
        tokens_per_local_expert = torch.full((L,), P * C, dtype=torch.long, device=device)

        handle = AllToAllHandle(state, num_rows, None, None, None, slot_of_row_N, C)
        return expert_in, tokens_per_local_expert, handle

    # combine ----------------------------------------------------------------------------------
    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        if handle.capacity is None:
            y_sorted = self._combine_dropless(y_RD, handle)
        else:
            y_sorted = self._combine_capacity(y_RD, handle)
        return unpermute(y_sorted, weights_TK, handle.permute_state)

    def _combine_dropless(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        assert handle.local_order_R is not None and handle.send_splits is not None
        inverse_R = torch.empty_like(handle.local_order_R)
        inverse_R[handle.local_order_R] = torch.arange(handle.local_order_R.numel(), device=y_RD.device)
        y_recv = y_RD.index_select(0, inverse_R)
        y_sent = comms.AllToAll.apply(y_recv, handle.send_splits, handle.recv_splits, self.ep_group,
                                      self.record)
        padding = handle.num_sorted_rows - y_sent.shape[0]
        return torch.cat([y_sent, y_sent.new_zeros(padding, y_sent.shape[1])]) if padding else y_sent

    def _combine_capacity(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        assert handle.slot_of_row_N is not None and handle.capacity is not None
        P, L, C = self.ep_size, self.num_local_experts, handle.capacity
        dim = y_RD.shape[1]
        y_recv = y_RD.view(L, P, C, dim).transpose(0, 1).reshape(P * L * C, dim)
        splits = [L * C] * P
        y_back = comms.AllToAll.apply(y_recv, splits, splits, self.ep_group, self.record)  # [E*C, D]
        y_ext = torch.cat([y_back, y_back.new_zeros(1, dim)])
        return y_ext.index_select(0, handle.slot_of_row_N)


# --------------------------------------------------------------------------------------------
# Layout arithmetic (pure, unit-tested without processes)
# --------------------------------------------------------------------------------------------

def local_expert_major_order(recv_counts_E: torch.Tensor, num_local_experts: int,
                             num_recv: int) -> torch.Tensor:
    """Permutation taking received rows, grouped (source rank, local expert), to local-expert
    major order (source rank second): ``expert_in = recv.index_select(0, order)``.

    ``recv_counts_E[s*L + l]`` rows came from rank s for local expert l; ``num_recv`` is their
    host-side sum (so ``repeat_interleave`` needs no extra sync).
    """
    num_sources = recv_counts_E.numel() // num_local_experts
    expert_of_block = torch.arange(num_local_experts, device=recv_counts_E.device).repeat(num_sources)
    expert_R = torch.repeat_interleave(expert_of_block, recv_counts_E, output_size=num_recv)
    return stable_argsort_small(expert_R, num_local_experts - 1)


def sorted_expert_ids(tokens_per_expert_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert id of every row of the permuted buffer; the uncounted (invalid) tail gets E."""
    num_experts = tokens_per_expert_E.numel()
    ids = torch.arange(num_experts + 1, device=tokens_per_expert_E.device)
    invalid = (num_rows - tokens_per_expert_E.sum()).view(1)
    return torch.repeat_interleave(ids, torch.cat([tokens_per_expert_E, invalid]), output_size=num_rows)


def capacity_slots(tokens_per_expert_E: torch.Tensor, capacity: int,
                   num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map between the permuted rows and a fixed [E, C] send buffer, without a host sync.

    Returns ``(src_row_EC, slot_of_row_N)``: slot ``e*C + c`` reads permuted row
    ``src_row_EC[e, c]`` (``num_rows``, an appended zero row, where expert e has fewer than
    c+1 rows), and permuted row i sits in slot ``slot_of_row_N[i]`` (``E*C``, a trash slot,
    for invalid rows and rows beyond an expert's capacity).
    """
    num_experts = tokens_per_expert_E.numel()
    device = tokens_per_expert_E.device
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    col_C = torch.arange(capacity, device=device)
    kept_E = tokens_per_expert_E.clamp(max=capacity)
    src_row_EC = torch.where(col_C < kept_E.unsqueeze(1), starts_E.unsqueeze(1) + col_C, num_rows)
    expert_N = sorted_expert_ids(tokens_per_expert_E, num_rows)
    pos_N = torch.arange(num_rows, device=device) - starts_E.index_select(0, expert_N.clamp(max=num_experts - 1))
    keep_N = (expert_N < num_experts) & (pos_N < capacity)
    slot_of_row_N = torch.where(keep_N, expert_N * capacity + pos_N, num_experts * capacity)
    return src_row_EC, slot_of_row_N
