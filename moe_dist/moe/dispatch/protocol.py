"""The interface between an MoE layer and wherever its experts live.

Every dispatcher is used the same way::

    expert_in, tokens_per_local_expert, handle = dispatcher.dispatch(x_TD, indices_TK, valid_TK)
    expert_out = experts(expert_in, tokens_per_local_expert)
    y_TD = dispatcher.combine(expert_out, weights_TK, handle)

:class:`~moe_dist.moe.dispatch.local.LocalDispatcher` keeps everything on one device;
:class:`~moe_dist.moe.dispatch.all_to_all.AllToAllDispatcher` moves the rows to the ep rank that
holds their expert and back. ``expert_in`` is grouped by local expert, ``tokens_per_local_expert``
counts its rows per local expert (rows past the count are padding), and ``handle`` is whatever
``combine`` needs to undo the move.

Shapes: T tokens, K slots, D hidden, R rows handed to the local experts, L local experts.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Dispatcher(Protocol):
    num_experts: int
    """Global number of experts that ``indices_TK`` refers to."""

    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor,
                 valid_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (expert_in [R, D], tokens_per_local_expert [L], handle)."""
        ...

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, handle: Any) -> torch.Tensor:
        """Expert outputs [R, D] -> the weighted sum per token [T, D]."""
        ...
