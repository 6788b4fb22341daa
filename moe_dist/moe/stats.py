"""Per-layer expert-load counters, accumulated on device between logging steps.

Each MoE layer owns one :class:`ExpertLoadStats`. The layer adds to it on every training
forward pass without any host synchronisation; the trainer's ``ExpertLoadTracker`` stacks the
counters of all layers, reduces them once per logging window and resets them.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertLoadStats(nn.Module):
    """Counters over the current logging window, indexed by global expert id.

    ``routed[e]``: (token, expert) assignments the router made to expert e.
    ``kept[e]``: assignments that survived the capacity limit (what the expert computed).
    ``tokens``: tokens (or routed items) seen by the router.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("routed", torch.zeros(num_experts), persistent=False)
        self.register_buffer("kept", torch.zeros(num_experts), persistent=False)
        self.register_buffer("tokens", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def update(self, routed_per_expert: torch.Tensor, kept_per_expert: torch.Tensor, num_tokens: int) -> None:
        self.routed += routed_per_expert.to(self.routed.dtype)
        self.kept += kept_per_expert.to(self.kept.dtype)
        self.tokens += num_tokens

    @torch.no_grad()
    def reset(self) -> None:
        self.routed.zero_()
        self.kept.zero_()
        self.tokens.zero_()
