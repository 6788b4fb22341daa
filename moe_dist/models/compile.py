"""``train.compile``: torch.compile each transformer block's forward.

Compiling block by block (torchtitan's choice, not the whole model) keeps compilation short:
blocks of one shape share one graph, recompiled only for a block that differs (an MoE block
beside a dense one). Only ``forward`` is replaced, not the module's call, so module hooks (the
expert-parallel and data-parallel gradient hooks, the optimizer offload's gradient hooks) run
outside the compiled region as before, and parameter names and checkpoints do not change.

Compile first, then activation checkpointing: 'full' recompute then runs the compiled block
inside ``torch.utils.checkpoint`` (forward and recompute both compiled). The other order does not
compile at all: the recompute wrapper counts its calls in a Python closure, which Dynamo cannot
trace, so it would fall back to eager silently. With 'selective' the block compiles in pieces
around the wrapped attention and experts (graph breaks there), which run eager.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module) -> nn.Module:
    """Replace ``forward`` of every block in ``model.layers`` by its ``torch.compile``d version;
    in place. A model without ``.layers`` is a ValueError (say which model to compile)."""
    blocks = list(getattr(model, "layers", []))
    if not blocks:
        raise ValueError(f"train.compile needs a model with blocks in '.layers'; {type(model).__name__} has none")
    for block in blocks:
        if getattr(block, "_compiled", False):
            raise ValueError("train.compile: the blocks of this model are already compiled")
        block.forward = torch.compile(block.forward)
        block._compiled = True
    return model
