"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a model that expert parallelism has already
sliced: dense parameters sharded over the dp ranks, expert parameters over the edp ranks.

:func:`apply_fsdp` runs after :func:`~moe_dist.models.parallelize.parallelize_model` (EP has cut
each rank's experts to its ``num_experts / ep`` block). In order:

1. every module whose own parameters are expert shards (``GroupedExperts``) is wrapped on the
   **edp** mesh, sharded along dim 1 (dim 0, the expert dim, is already split over ep), with a
   gradient divide factor of **dp** (the rule of ``distributed/grad_sync.py``: an expert
   gradient is the sum over edp divided by dp, not an average over edp);
2. every transformer block is wrapped on the **dp** mesh (its experts are already wrapped, so
   the block takes attention, norms, router and shared experts);
3. the root takes what is left (embeddings, final norm, head) on the dp mesh;
4. explicit prefetching (torchtitan's pattern): in forward, block ``i`` all-gathers block
   ``i+1`` and its experts; in backward, block ``i`` all-gathers block ``i-1`` and its experts.
   The all-to-all's device-to-host sync would otherwise delay FSDP's implicit prefetch.

Worked example, world 4, ``ep=2`` (dense view dp=4; MoE view edp=2 x ep=2), 8 experts,
``w13[E, D, 2F]`` with D=64:

=====  =========================  ======================================================
rank   dense ``wq [64, 64]``        expert ``w13``: ep block, then edp half of dim 1
=====  =========================  ======================================================
0      rows 0-15 (dp group all)   experts 0-3 (ep rank 0), D columns 0-31 (edp rank 0)
1      rows 16-31                 experts 4-7 (ep rank 1), D columns 0-31 (edp rank 0)
2      rows 32-47                 experts 0-3 (ep rank 0), D columns 32-63 (edp rank 1)
3      rows 48-63                 experts 4-7 (ep rank 1), D columns 32-63 (edp rank 1)
=====  =========================  ======================================================

edp groups are [0,2] and [1,3]: FSDP reduce-scatters an expert gradient over them (a sum) and
divides by 4 (dp), which turns the all-to-all's sum over the ep group into the global mean.

Mixed precision: with ``param_dtype=torch.bfloat16`` (CUDA, ``train.dtype`` auto or bf16) the
all-gathered parameters and the compute are bf16 and gradients are reduce-scattered in fp32;
the sharded parameters and AdamW's state stay fp32. With ``param_dtype=None`` (CPU) everything
stays fp32, so a gloo run matches the unsharded model. Forward inputs are not cast
(``cast_forward_inputs=False``): the rotary tables a block receives stay fp32.

On gloo (CPU) FSDP is told to reduce with SUM and divide afterwards: gloo has neither the AVG
nor the PREMUL_SUM reduction FSDP uses on NCCL. With ep = world (edp=1) the experts sit on a
size-1 mesh: no collective, only the division by dp.

Every parameter becomes a DTensor; :func:`apply_fsdp` copies the tags of
``distributed/param_tags.py`` onto the new parameters, so clipping and checkpoints still know
which are expert shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import is_expert_param, set_tags, tags_of

EXPERT_SHARD_DIM = 1
"""FSDP splits expert weights along this dim over edp (dim 0, the experts, is split over ep)."""


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose own parameters are all expert shards (``GroupedExperts``)."""
    found = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        experts = [n for n, p in own if is_expert_param(p)]
        if experts and len(experts) != len(own):
            raise ValueError(f"module {name or '<root>'} holds expert parameters {experts} beside "
                             f"others; FSDP shards experts over edp and the rest over dp, so they "
                             "must live in separate modules")
        if experts:
            found.append(module)
    return found


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh`` (see the module docstring); return it.

    ``param_dtype`` None keeps fp32 parameters and compute; ``torch.bfloat16`` all-gathers bf16
    parameters and reduce-scatters fp32 gradients.
    """
    if mesh.dense_mesh is None or mesh.moe_mesh is None:
        raise ValueError("FSDP needs a process group and a mesh (world size > 1)")
    if mesh.tp_size != 1 or mesh.etp_size != 1:
        raise ValueError(f"FSDP with parallel.tp ({mesh.tp_size}) or parallel.etp ({mesh.etp_size}) > 1 "
                         "is not supported; use tp=1 and etp=1")
    blocks = list(getattr(model, "layers", []))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no 'layers' to wrap one block at a time")
    tags = {name: tags_of(p) for name, p in model.named_parameters()}
    dp_mesh, edp_mesh = mesh.dense_mesh["dp"], mesh.moe_mesh["edp"]  # edp may have size 1
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                     reduce_dtype=torch.float32 if param_dtype is not None else None,
                                     cast_forward_inputs=False)

    # 1. experts over edp, dim 1, gradient divided by dp
    experts = expert_modules(model)
    last = set(blocks[-1].modules())
    for module in experts:
        for name, param in module.named_parameters(recurse=False):
            if param.ndim < 2 or param.shape[EXPERT_SHARD_DIM] % mesh.edp_size:
                raise ValueError(f"expert parameter {name} {tuple(param.shape)}: dim {EXPERT_SHARD_DIM} must be "
                                 f"divisible by the edp size ({mesh.edp_size}) to shard it with FSDP")
        fully_shard(module, mesh=edp_mesh, mp_policy=mp_policy,
                    shard_placement_fn=lambda _: Shard(EXPERT_SHARD_DIM),
                    reshard_after_forward=module not in last)
        module.set_gradient_divide_factor(float(mesh.dp_size))
    # 2. blocks over dp (the last stays unsharded after forward: backward needs it at once)
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=block is not blocks[-1])
    # 3. the rest: embeddings, final norm, head
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)

    if dp_mesh.device_type == "cpu":  # gloo: SUM, then divide (no AVG / PREMUL_SUM)
        for module in fsdp_modules(model):
            # Not on a size-1 mesh (edp=1): no collective runs there, and torch 2.13 would divide
            # by the factor twice (once in its world-size-1 copy, once more after it).
            if module not in experts or mesh.edp_size > 1:
                module.set_force_sum_reduction_for_comms(True)

    # 4. prefetching: each block with its experts
    def unit(block: nn.Module) -> list[FSDPModule]:
        return [block, *(m for m in experts if m in set(block.modules()))]

    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch(unit(blocks[i + 1]))
        if i > 0:
            block.set_modules_to_backward_prefetch(unit(blocks[i - 1]))
    model.set_modules_to_forward_prefetch(unit(blocks[0]))

    for name, param in model.named_parameters():
        set_tags(param, tags[name])
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
