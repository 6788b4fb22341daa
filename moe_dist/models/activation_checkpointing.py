"""Activation checkpointing (``train.activation_checkpointing``): recompute activations in
backward instead of keeping them, applied to a built model in place.

* ``selective``: every :class:`~moe_dist.models.transformer.Attention` (projections, RoPE, SDPA)
  and every :class:`~moe_dist.moe.experts.GroupedExperts` (the expert SwiGLUs, the largest
  activations of an MoE block) keep only their inputs. Routing is not recomputed.
* ``full``: every transformer block keeps only its input; backward recomputes one block at a time.

A recomputed block routes again, so it must not count again: its routing statistics (expert load,
drops, realised k, aux-free bias counts, DynMoE records, capacity-controller counts) live in the
block's buffers, and the recompute runs with those buffers restored afterwards to their values
before it. Recompute routes every token to the same experts: the inputs are the same, the routing
state only changes after the optimizer step, and ``torch.utils.checkpoint`` replays the RNG state
(router jitter). Under expert parallelism the recompute repeats the block's all-to-alls in
backward, in the same order on every rank.

The model's forward methods are replaced on the instances, so parameter names, hooks (tensor
parallelism) and checkpoints are the same with and without recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_dist.models.transformer import Attention
from moe_dist.moe.experts import GroupedExperts

MODES = ("none", "selective", "full")


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run the body, then put every buffer of ``module`` back to its value from before."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.detach().copy_(value)


def _recomputed_forward(module: nn.Module, restore_buffers: bool) -> Callable[..., Any]:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls = 0

        def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1 or not restore_buffers:  # the forward pass itself
                return original(*inner_args, **inner_kwargs)
            with buffers_restored(module):  # a recompute in backward: count nothing again
                return original(*inner_args, **inner_kwargs)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Make ``model`` recompute activations as ``mode`` says (see the module docstring); in place."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing ({mode!r}) must be one of {MODES}")
    if mode == "none":
        return model
    if mode == "full":
        targets = list(getattr(model, "layers", []))
        if not targets:
            raise ValueError(f"train.activation_checkpointing='full' needs a model with blocks in "
                             f"'.layers'; {type(model).__name__} has none")
    else:
        targets = [m for m in model.modules() if isinstance(m, (Attention, GroupedExperts))]
    for module in targets:
        if getattr(module, "_recompute", None):
            raise ValueError("activation checkpointing is already applied to this model")
        module.forward = _recomputed_forward(module, restore_buffers=mode == "full")
        module._recompute = mode
    return model
