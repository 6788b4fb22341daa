"""Single-device dispatch: every expert is local (the ep=1 path, and the reference of the
all-to-all dispatcher).

Shapes: T tokens, K slots, N = T*K assignments, D hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_dist.moe.dispatch.permutation import PermuteState, permute, unpermute
from moe_dist.moe.experts import to_autocast_dtype


@dataclass
class LocalHandle:
    permute_state: PermuteState
    padding_rows: int = 0  # invalid rows cut off before the experts (CPU only)


class LocalDispatcher:
    """Single-device dispatch: every expert is local."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, valid_TK: torch.Tensor | None):
        # Under CUDA autocast, permute the rows already in the autocast dtype (half the bytes).
        x_TD = to_autocast_dtype(x_TD)
        x_sorted, tokens_per_expert, state = permute(x_TD, indices_TK, self.num_experts, valid_TK)
        padding = 0
        if valid_TK is not None and not x_sorted.is_cuda:
            # Variable-k routing and drops leave padding rows at the end. On the CPU a host read is
            # free, so cut them off and the experts compute only the rows that were routed; on
            # the GPU the shapes stay fixed instead (no sync).
            # NOTE: device-to-host sync (CPU only, see above).
            padding = x_sorted.shape[0] - int(tokens_per_expert.sum())
            x_sorted = x_sorted[:x_sorted.shape[0] - padding]
        return x_sorted, tokens_per_expert, LocalHandle(state, padding)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        if handle.padding_rows:
            y_ND = torch.cat([y_ND, y_ND.new_zeros(handle.padding_rows, y_ND.shape[-1])])
        return unpermute(y_ND, weights_TK, handle.permute_state)
