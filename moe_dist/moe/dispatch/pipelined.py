"""Chunked all-to-all dispatch whose exchanges overlap the experts (``moe.dispatch_chunks``).

:func:`run_pipelined` does what ``dispatch -> experts -> combine`` of
:class:`~moe_dist.moe.dispatch.all_to_all.AllToAllDispatcher` does, in ``n`` chunks: while the
local experts compute chunk j, the rows of chunk j+1 travel to them and the outputs of chunk
j-1 travel back. Every row meets the same expert with the same weight as without chunks, so the
output is the same up to the summation order of the expert weight gradients.

Shapes: T tokens, K slots, N = T*K assignments, D hidden, E global experts, P = ep ranks,
L = E / P local experts, C per-expert capacity, n chunks.

What a chunk is. The layer's assignments are sorted by expert once, as unchunked; chunk j then
takes a contiguous 1/n of every expert's rows, so every chunk keeps every expert busy:

* dropless: rows ``[floor(j*c_e/n), floor((j+1)*c_e/n))`` of expert e's ``c_e`` rows. The
  per-(expert, chunk) counts of all chunks travel in one count exchange and one host read (the
  same one host sync per layer as unchunked). The rows are gathered straight into chunk order
  and un-permuted from it, so chunking adds no pass over the rows;
* fixed capacity: slots ``[floor(j*C/n), floor((j+1)*C/n))`` of each expert's C slots, so a chunk
  is a static ``[E, C_j]`` buffer and the drops are exactly the unchunked layer's (capacity is
  decided on the whole layer's tokens). No host sync, as unchunked.

Worked example, dropless, E=4, P=2, n=2: rank 0 routes counts [3, 0, 1, 2]. Chunk 0 takes
[1, 0, 0, 1] of them (floor(c/2)) and chunk 1 the rest, [2, 0, 1, 1]; rank 0 sends chunk 0 as
splits [1, 1] and chunk 1 as [2, 2].

Collective order, the same on every rank for any routing (no branch on data; a chunk with no
rows still exchanges): [count exchange (dropless) | capacity agreement (fixed, once per token
count)], then dispatch 0, dispatch 1, combine 0, dispatch 2, combine 1, ..., combine n-1.
``side_work`` (the shared experts) runs while dispatch 0 is in flight. Backward (split-phase
autograd all-to-all, ``comms.all_to_all_start``/``all_to_all_wait``): each gradient exchange is
issued by the wait's backward and waited for by the start's backward, so it overlaps the backward
of the other chunks' experts.

On CUDA the exchanges run on the process group's stream (NCCL) and ``wait`` makes the compute
stream wait for them, so the compute stream never blocks the host; on gloo they run on gloo's
threads while the main thread computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from moe_dist.distributed import comms
from moe_dist.moe.dispatch.all_to_all import (AllToAllDispatcher, capacity_slots, local_expert_major_order,
                                              sorted_expert_ids)
from moe_dist.moe.dispatch.permutation import (expert_sort, gather_in_order, inverse_permutation, stable_argsort_small,
                                                unpermute)
from moe_dist.moe.experts import to_autocast_dtype

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``experts(expert_in [R, D], tokens_per_local_expert [L]) -> [R, D]``."""


def run_pipelined(dispatcher: AllToAllDispatcher, x_TD: torch.Tensor, indices_TK: torch.Tensor,
                  valid_TK: torch.Tensor | None, weights_TK: torch.Tensor, experts: ExpertsFn,
                  num_chunks: int, side_work: Callable[[], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed experts' weighted output per token [T, D] (and ``side_work()``'s result),
    exchanging the rows in ``num_chunks`` overlapped chunks (see the module docstring)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks ({num_chunks}) must be >= 1")
    x_TD = to_autocast_dtype(x_TD)
    sort_order_N, tokens_per_expert_E = expert_sort(indices_TK, dispatcher.num_experts, valid_TK)
    num_tokens, top_k = indices_TK.shape
    capacity = dispatcher.capacity_fn(num_tokens, top_k) if dispatcher.capacity_fn is not None else None
    chunks: _Chunks
    if capacity is None:
        # Gather the rows straight into chunk order (expert sort, then chunk-major re-sort, as one
        # permutation), and un-permute from that order: no extra pass over the rows.
        order_N = sort_order_N.index_select(
            0, chunk_major_order(tokens_per_expert_E, num_chunks, sort_order_N.numel()))
        x_chunked_ND, state = gather_in_order(x_TD, order_N, top_k, valid_TK)
        chunks = DroplessChunks(dispatcher, x_chunked_ND, tokens_per_expert_E, num_chunks)
    else:
        dispatcher.agree_on_capacity(num_tokens, top_k, capacity, x_TD.device)
        x_sorted_ND, state = gather_in_order(x_TD, sort_order_N, top_k, valid_TK)
        chunks = CapacityChunks(dispatcher, x_sorted_ND, tokens_per_expert_E, capacity, num_chunks)
    y_ND, side = _pipeline(chunks, experts, side_work)
    return unpermute(y_ND, weights_TK, state), side


class _Chunks(Protocol):
    num_chunks: int

    def dispatch(self, j: int) -> tuple[torch.Tensor, comms.AllToAllTicket]: ...

    def expert_input(self, j: int, recv_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def combine(self, j: int, y_RD: torch.Tensor) -> tuple[torch.Tensor, comms.AllToAllTicket]: ...

    def assemble(self, back: list[torch.Tensor]) -> torch.Tensor: ...


def _pipeline(chunks: _Chunks, experts: ExpertsFn, side_work: Callable[[], torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    def start(rows_and_ticket: tuple[torch.Tensor, comms.AllToAllTicket]):
        rows, ticket = rows_and_ticket
        return comms.all_to_all_start(rows, ticket), ticket

    in_flight = start(chunks.dispatch(0))
    side = side_work() if side_work is not None else None  # overlaps dispatch 0
    returning = []
    for j in range(chunks.num_chunks):
        recv_RD = comms.all_to_all_wait(*in_flight)
        if j + 1 < chunks.num_chunks:
            in_flight = start(chunks.dispatch(j + 1))  # overlaps the experts of chunk j
        expert_in, tokens_per_local_expert = chunks.expert_input(j, recv_RD)
        returning.append(start(chunks.combine(j, experts(expert_in, tokens_per_local_expert))))
    back = [comms.all_to_all_wait(buffer, ticket) for buffer, ticket in returning]
    return chunks.assemble(back), side


# --------------------------------------------------------------------------------------------
# Dropless chunks
# --------------------------------------------------------------------------------------------

class DroplessChunks:
    """Chunk j holds rows ``[floor(j*c_e/n), floor((j+1)*c_e/n))`` of every expert e.

    ``x_chunked_ND`` holds the rows in :func:`chunk_major_order` (chunk-major, expert-minor,
    the uncounted tail last); :meth:`assemble` returns the outputs in that same order."""

    def __init__(self, dispatcher: AllToAllDispatcher, x_chunked_ND: torch.Tensor,
                 tokens_per_expert_E: torch.Tensor, num_chunks: int) -> None:
        P, L, n = dispatcher.ep_size, dispatcher.num_local_experts, num_chunks
        self.dispatcher, self.num_chunks = dispatcher, n
        self.x_chunked_ND = x_chunked_ND
        self.num_rows = x_chunked_ND.shape[0]
        counts_En = chunk_counts(tokens_per_expert_E, n)
        # One count exchange for every chunk: the [E, n] counts are owner-contiguous like [E].
        self.recv_counts_PLn = comms.exchange_counts(counts_En.reshape(-1), dispatcher.ep_group,
                                                     dispatcher.record).view(P, L, n)
        send_nP = counts_En.view(P, L, n).sum(1).t()
        recv_nP = self.recv_counts_PLn.sum(1).t()
        # NOTE: device-to-host sync -- sizes every chunk's receive buffer (one per layer, as unchunked).
        splits = torch.cat([send_nP.reshape(-1), recv_nP.reshape(-1)]).tolist()
        dispatcher.host_syncs += 1
        self.send_splits = [splits[j * P:(j + 1) * P] for j in range(n)]
        self.recv_splits = [splits[(n + j) * P:(n + j + 1) * P] for j in range(n)]
        sent = [sum(s) for s in self.send_splits]
        self.starts = [sum(sent[:j]) for j in range(n + 1)]
        self.local_order: list[torch.Tensor] = []

    def dispatch(self, j: int) -> tuple[torch.Tensor, comms.AllToAllTicket]:
        rows = self.x_chunked_ND[self.starts[j]:self.starts[j + 1]]
        d = self.dispatcher
        return rows, comms.AllToAllTicket(self.recv_splits[j], self.send_splits[j], d.ep_group, d.record)

    def expert_input(self, j: int, recv_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts_PL = self.recv_counts_PLn[:, :, j]
        order_R = local_expert_major_order(counts_PL.reshape(-1), self.dispatcher.num_local_experts,
                                           sum(self.recv_splits[j]))
        self.local_order.append(order_R)
        return recv_RD.index_select(0, order_R), counts_PL.sum(0)

    def combine(self, j: int, y_RD: torch.Tensor) -> tuple[torch.Tensor, comms.AllToAllTicket]:
        y_recv = y_RD.index_select(0, inverse_permutation(self.local_order[j]))
        d = self.dispatcher
        return y_recv, comms.AllToAllTicket(self.send_splits[j], self.recv_splits[j], d.ep_group, d.record)

    def assemble(self, back: list[torch.Tensor]) -> torch.Tensor:
        # Always the same ops (an empty padding block too): the autograd graph must not depend on data.
        padding = back[0].new_zeros(self.num_rows - self.starts[-1], back[0].shape[1])
        return torch.cat([*back, padding])


def chunk_counts(sizes_E: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[E, n]: rows of each expert in each chunk, ``floor((j+1)*c/n) - floor(j*c/n)``."""
    j = torch.arange(num_chunks + 1, device=sizes_E.device)
    bounds = sizes_E.unsqueeze(1) * j // num_chunks
    return bounds[:, 1:] - bounds[:, :-1]


def chunk_major_order(tokens_per_expert_E: torch.Tensor, num_chunks: int, num_rows: int) -> torch.Tensor:
    """Permutation of the expert-sorted rows to chunk-major, expert-minor order (the uncounted
    tail last): ``x_chunked = x_sorted.index_select(0, order)``.

    Row p (0-based) of expert e's c_e rows is in chunk ``floor(((p+1)*n - 1) / c_e)``, the j with
    ``floor(j*c_e/n) <= p < floor((j+1)*c_e/n)``, matching :func:`chunk_counts`.
    """
    num_experts = tokens_per_expert_E.numel()
    device = tokens_per_expert_E.device
    expert_N = sorted_expert_ids(tokens_per_expert_E, num_rows)
    expert_safe_N = expert_N.clamp(max=num_experts - 1)
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    pos_N = torch.arange(num_rows, device=device) - starts_E.index_select(0, expert_safe_N)
    count_N = tokens_per_expert_E.index_select(0, expert_safe_N).clamp(min=1)
    chunk_N = ((pos_N + 1) * num_chunks - 1) // count_N
    key_N = torch.where(expert_N < num_experts, chunk_N * num_experts + expert_N, num_chunks * num_experts)
    return stable_argsort_small(key_N, num_chunks * num_experts)


# --------------------------------------------------------------------------------------------
# Fixed-capacity chunks
# --------------------------------------------------------------------------------------------

class CapacityChunks:
    """Chunk j holds slots ``[floor(j*C/n), floor((j+1)*C/n))`` of every expert's C slots."""

    def __init__(self, dispatcher: AllToAllDispatcher, x_sorted_ND: torch.Tensor,
                 tokens_per_expert_E: torch.Tensor, capacity: int, num_chunks: int) -> None:
        self.dispatcher, self.num_chunks, self.capacity = dispatcher, num_chunks, capacity
        num_rows, dim = x_sorted_ND.shape
        self.src_row_EC, self.slot_of_row_N = capacity_slots(tokens_per_expert_E, capacity, num_rows)
        self.x_ext = torch.cat([x_sorted_ND, x_sorted_ND.new_zeros(1, dim)])  # row num_rows: zeros
        self.bounds = [j * capacity // num_chunks for j in range(num_chunks + 1)]

    def _width(self, j: int) -> int:
        return self.bounds[j + 1] - self.bounds[j]

    def _ticket(self, j: int) -> comms.AllToAllTicket:
        d = self.dispatcher
        splits = [d.num_local_experts * self._width(j)] * d.ep_size
        return comms.AllToAllTicket(splits, splits, d.ep_group, d.record)

    def dispatch(self, j: int) -> tuple[torch.Tensor, comms.AllToAllTicket]:
        src = self.src_row_EC[:, self.bounds[j]:self.bounds[j + 1]].reshape(-1)
        return self.x_ext.index_select(0, src), self._ticket(j)  # [E*C_j, D], rank-major

    def expert_input(self, j: int, recv_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, width, dim = self.dispatcher, self._width(j), recv_RD.shape[1]
        P, L = d.ep_size, d.num_local_experts
        expert_in = recv_RD.view(P, L, width, dim).transpose(0, 1).reshape(L * P * width, dim)
        return expert_in, torch.full((L,), P * width, dtype=torch.long, device=recv_RD.device)

    def combine(self, j: int, y_RD: torch.Tensor) -> tuple[torch.Tensor, comms.AllToAllTicket]:
        d, width, dim = self.dispatcher, self._width(j), y_RD.shape[1]
        P, L = d.ep_size, d.num_local_experts
        return y_RD.view(L, P, width, dim).transpose(0, 1).reshape(P * L * width, dim), self._ticket(j)

    def assemble(self, back: list[torch.Tensor]) -> torch.Tensor:
        num_experts, dim = self.dispatcher.num_experts, back[0].shape[1]
        blocks = [b.view(num_experts, self._width(j), dim) for j, b in enumerate(back)]
        y_back = torch.cat(blocks, dim=1).reshape(num_experts * self.capacity, dim)
        y_ext = torch.cat([y_back, y_back.new_zeros(1, dim)])
        return y_ext.index_select(0, self.slot_of_row_N)
