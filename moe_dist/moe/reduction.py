"""The one hook through which single-device MoE code reaches other ranks outside dispatch.

Routing state (aux-free bias, capacity controllers, DynMoE growth) and load statistics must stay
identical on every rank, so they are updated from counts summed over every rank that routes
different tokens. The trainer's plan supplies that sum as a ``ReduceFn``; None means one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ReduceFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``fn(t)`` reduces ``t`` over ranks, in place or by returning the result (None: in place)."""


def reduce_with(tensor: torch.Tensor, reduce_fn: ReduceFn | None) -> torch.Tensor:
    """``tensor`` reduced by ``reduce_fn`` (itself when there is nothing to reduce over)."""
    if reduce_fn is None:
        return tensor
    reduced = reduce_fn(tensor)
    return tensor if reduced is None else reduced
