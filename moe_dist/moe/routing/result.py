"""What every router returns.

A router maps tokens to experts and returns data, never side effects: a :class:`RoutingResult`
with the chosen expert ids, their combine weights, a validity mask (capacity and variable-k
routers switch slots off), per-expert counts and the weighted balancing losses.

Shapes: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingResult:
    indices: torch.Tensor  # [T, K] int64, global expert ids
    weights: torch.Tensor  # [T, K] fp32 combine weights (0 where not valid)
    valid: torch.Tensor | None  # [T, K] bool, None when every slot is used
    scores: torch.Tensor  # [T, E] fp32 router probabilities (softmax or sigmoid)
    tokens_per_expert: torch.Tensor  # [E] int64, assignments before capacity
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already weighted

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]
