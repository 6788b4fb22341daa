"""Capacity policies as pure functions: how many assignments each expert may take.

Priority among assignments competing for an expert's slots follows GShard: every first
choice before every second choice, and within a slot, token order ('position') or the gate
score ('score'). Dropped assignments get zero expert output; the token survives through the
residual connection.
"""

from __future__ import annotations

import math

import torch

from moe_dist.moe.dispatch.permutation import count_per_expert


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 1) -> int:
    """``C = ceil(capacity_factor * T * K / E)``, at least ``min_capacity``."""
    return max(int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)), min_capacity)


def positions_in_expert(indices_TK: torch.Tensor, num_experts: int, valid_TK: torch.Tensor | None = None,
                        priority_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each assignment inside its expert's buffer, in priority order.

    Default priority: slot-major, then token order. ``priority_TK`` (higher first) replaces
    the token order within a slot. Invalid slots get position ``T*K`` (never kept).
    """
    num_tokens, top_k = indices_TK.shape
    n = num_tokens * top_k
    # Flatten slot-major so that all first choices come before all second choices.
    experts_N = indices_TK.t().reshape(n)
    if valid_TK is not None:
        experts_N = torch.where(valid_TK.t().reshape(n), experts_N, num_experts)
    if priority_TK is None:
        order_N = torch.arange(n, device=indices_TK.device)
    else:
        # Within each slot, highest priority first; slots stay in order. Two stable sorts (by
        # priority, then by slot) compare priorities exactly: one fused float key merged near-ties.
        slot_N = torch.arange(top_k, device=indices_TK.device).repeat_interleave(num_tokens)
        by_priority_N = torch.argsort(priority_TK.t().reshape(n), descending=True, stable=True)
        order_N = by_priority_N[torch.argsort(slot_N[by_priority_N], stable=True)]
    expert_in_order = experts_N[order_N]
    sorted_experts, by_expert = torch.sort(expert_in_order, stable=True)
    counts = count_per_expert(sorted_experts, num_experts + 1)  # no host sync on CUDA
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n, device=indices_TK.device) - starts[sorted_experts]
    positions_N = torch.empty(n, dtype=torch.long, device=indices_TK.device)
    positions_N[order_N[by_expert]] = rank_in_expert
    positions_N = torch.where(experts_N == num_experts, n, positions_N)
    return positions_N.view(top_k, num_tokens).t()


def apply_capacity(indices_TK: torch.Tensor, valid_TK: torch.Tensor | None, num_experts: int,
                   capacity: int, scores_TK: torch.Tensor | None = None) -> torch.Tensor:
    """The validity mask after dropping assignments beyond ``capacity`` per expert."""
    positions = positions_in_expert(indices_TK, num_experts, valid_TK, scores_TK)
    kept = positions < capacity
    return kept if valid_TK is None else kept & valid_TK
