"""Permutation shared by every dispatcher: sort (token, expert) assignments by expert, and
weight and un-sort the expert outputs. No communication.

Shapes: T tokens, K slots, N = T*K assignments, D hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_dist.moe.kernels import permute as permute_kernels


@dataclass
class PermuteState:
    """What :func:`unpermute` needs to put expert outputs back in token order."""

    sort_order_N: torch.Tensor  # assignment index (token-major t*K+k) of each sorted row
    valid_N: torch.Tensor | None  # validity of each sorted row
    num_tokens: int
    top_k: int
    inverse_TK: torch.Tensor | None = None  # sorted row of each assignment (fast path only)
    valid_TK: torch.Tensor | None = None  # validity per assignment (fast path only)


def use_fast_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton permute/unpermute kernels run for this tensor: CUDA tensors only, so
    CPU runs keep the exact torch path."""
    return x.is_cuda and permute_kernels.triton_available()


def count_per_expert(experts_N: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``bincount(experts_N, minlength=num_bins)`` without a host sync on CUDA.

    CUDA ``bincount`` reads the maximum back to the host to size its output; a scatter-add into
    a fixed-size buffer does not (integer adds, so the counts are exact and deterministic).
    """
    if not experts_N.is_cuda:
        return torch.bincount(experts_N, minlength=num_bins)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=experts_N.device)
    return counts.scatter_add_(0, experts_N, torch.ones_like(experts_N, dtype=torch.int64))


def stable_argsort_small(keys_N: torch.Tensor, max_key: int) -> torch.Tensor:
    """``argsort(keys_N, stable=True)`` for keys in ``[0, max_key]``, with the keys narrowed to the
    smallest integer dtype that holds them first. On CUDA the sort is a radix sort over every bit
    of the key dtype: expert ids as uint8 take one pass where int64 takes eight. The order is
    the same whatever the dtype (the sort is stable)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if max_key <= torch.iinfo(dtype).max:
            return torch.argsort(keys_N.to(dtype), stable=True)
    return torch.argsort(keys_N, stable=True)


def permute(x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: int,
            valid_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, PermuteState]:
    """Gather token rows in expert order. Returns (x_sorted [N, D], tokens_per_expert [E], state).

    Invalid assignments are sorted to the end under a sentinel expert id and are not counted,
    so the shapes stay fixed (no host sync): the rows past ``tokens_per_expert.sum()`` are padding.
    """
    sort_order_N, tokens_per_expert = expert_sort(indices_TK, num_experts, valid_TK)
    x_sorted, state = gather_in_order(x_TD, sort_order_N, indices_TK.shape[1], valid_TK)
    return x_sorted, tokens_per_expert, state


def expert_sort(indices_TK: torch.Tensor, num_experts: int,
                valid_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [N]: the assignments (token-major t*K+k) sorted by expert, invalid ones last under
    a sentinel id; tokens_per_expert [E], invalid ones not counted)."""
    experts_N = indices_TK.reshape(-1)
    if valid_TK is not None:
        experts_N = torch.where(valid_TK.reshape(-1), experts_N, num_experts)
    sort_order_N = stable_argsort_small(experts_N, num_experts)
    tokens_per_expert = count_per_expert(experts_N, num_experts + 1)[:num_experts]
    return sort_order_N, tokens_per_expert


def gather_in_order(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int,
                    valid_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, PermuteState]:
    """Row n of the result is the token of assignment ``order_N[n]``; the state lets
    :func:`unpermute` put rows in this order back (any order of the N assignments works)."""
    num_tokens = order_N.numel() // top_k
    valid_N = None if valid_TK is None else valid_TK.reshape(-1)[order_N]
    if not use_fast_kernels(x_TD):
        x_sorted = x_TD.index_select(0, order_N // top_k)
        return x_sorted, PermuteState(order_N, valid_N, num_tokens, top_k)
    # Fast path: one gather kernel forward, one K-row sum kernel backward.
    inverse_TK = inverse_permutation(order_N).view(num_tokens, top_k)
    x_sorted = permute_kernels.PermuteRows.apply(x_TD, order_N, inverse_TK, valid_TK, True)
    return x_sorted, PermuteState(order_N, valid_N, num_tokens, top_k, inverse_TK, valid_TK)


def inverse_permutation(sort_order_N: torch.Tensor) -> torch.Tensor:
    """``inverse[order[i]] = i``: a scatter on the device (no host sync)."""
    inverse_N = torch.empty_like(sort_order_N)
    inverse_N[sort_order_N] = torch.arange(sort_order_N.numel(), device=sort_order_N.device)
    return inverse_N


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, state: PermuteState) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order.

    Deterministic: rows are un-sorted with a gather through the inverse permutation and then
    summed over the K slots, with no scatter-add. On CUDA one Triton kernel does the gather,
    the weighting and the sum (fp32 accumulation), and one more the backward.
    """
    if use_fast_kernels(y_ND) and y_ND.shape[0] == state.sort_order_N.numel():
        inverse_TK = state.inverse_TK
        if inverse_TK is None:
            inverse_TK = inverse_permutation(state.sort_order_N).view(state.num_tokens, state.top_k)
        valid_TK = state.valid_TK
        if valid_TK is None and state.valid_N is not None:
            valid_TK = torch.empty_like(state.valid_N)
            valid_TK[state.sort_order_N] = state.valid_N
            valid_TK = valid_TK.view(state.num_tokens, state.top_k)
        return permute_kernels.UnpermuteWeighted.apply(
            y_ND, weights_TK, state.sort_order_N, inverse_TK, state.valid_N, valid_TK, True)
    if state.valid_N is not None:
        y_ND = torch.where(state.valid_N.unsqueeze(-1), y_ND, 0.0)
    y_TKD = y_ND.index_select(0, inverse_permutation(state.sort_order_N)).view(
        state.num_tokens, state.top_k, y_ND.shape[-1])
    out_TD = torch.einsum("tkd,tk->td", y_TKD.float(), weights_TK.float())
    return out_TD.to(y_ND.dtype)
