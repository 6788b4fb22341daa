"""The bridge between moe_dist's process groups and DeepSpeed's group registry.

moe_dist's mesh owns the ep and edp process groups; DeepSpeed's ZeRO optimizer looks expert groups
up by name in ``deepspeed.utils.groups``. This module (with the DeepSpeed engine in
``moe_dist.train.engines``) is the only place that imports ``deepspeed``:

1. :func:`init_deepspeed_comm` attaches DeepSpeed's comm layer to the process group moe_dist
   already created;
2. :func:`register_expert_groups` stores *our own group objects* under the name
   ``ep_size_{ep}`` (DeepSpeed would otherwise create its own groups lazily; it never does here,
   because the name already exists);
3. :func:`tag_expert_params` marks each expert parameter ``allreduce=False`` and
   ``group_name='ep_size_{ep}'``, DeepSpeed's MoE parameter tags.

Worked example, world 4, ``ep=2``: ep groups [0,1] [2,3], edp groups [0,2] [1,3] are registered
as ``ep_size_2``; :func:`deepspeed_expert_ranks` reads them back through DeepSpeed's accessors.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import is_expert_param

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's registry key of the expert groups of degree ``ep_size``."""
    return f"ep_size_{ep_size}"


def _expert_data_parallel_group(mesh: ParallelMesh) -> ProcessGroup:
    """The edp group as a real process group, also when it holds one rank (DeepSpeed asks its
    size and partitions over it; ``None`` would mean the whole world there)."""
    if mesh.edp_group is not None:
        return mesh.edp_group
    assert mesh.moe_mesh is not None, "a distributed mesh has a MoE DeviceMesh"
    return mesh.moe_mesh["edp"].get_group()


def register_expert_groups(mesh: ParallelMesh) -> str | None:
    """Store moe_dist's ep and edp groups in DeepSpeed's registry; return the group name.

    Returns ``None`` when ``ep == 1`` (experts are then replicated like dense parameters and
    need no expert groups). Raises if the registry already holds *different* groups under the
    same name, e.g. created by DeepSpeed's own ``_create_expert_and_data_parallel``.
    """
    if mesh.ep_size == 1:
        return None
    import torch.distributed as dist
    from deepspeed.utils import groups

    name = expert_group_name(mesh.ep_size)
    ep_group, edp_group = mesh.ep_group, _expert_data_parallel_group(mesh)
    assert ep_group is not None
    for registry, group in ((groups._EXPERT_PARALLEL_GROUP, ep_group),
                            (groups._EXPERT_DATA_PARALLEL_GROUP, edp_group)):
        existing = registry.get(name)
        if existing is not None and existing is not group:
            raise RuntimeError(f"DeepSpeed's group registry already holds {name} with ranks "
                               f"{dist.get_process_group_ranks(existing)}; moe_dist registers its own mesh "
                               "groups and cannot run beside groups DeepSpeed created itself")
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = mesh.group_ranks("ep")
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = mesh.group_ranks("edp")
    return name


def deepspeed_expert_ranks(group_name: str) -> dict[str, list[int]]:
    """The global ranks DeepSpeed will use for this rank's ep and edp groups (for tests and
    ``--dry-run``): read back through DeepSpeed's own accessors."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    return {"ep": dist.get_process_group_ranks(groups._get_expert_parallel_group(group_name)),
            "edp": dist.get_process_group_ranks(groups._get_expert_data_parallel_group(group_name)),
            "ep_recorded": list(groups._get_expert_parallel_group_ranks(group_name)),
            "edp_recorded": list(groups._get_expert_data_parallel_group_ranks(group_name))}


def tag_expert_params(model: nn.Module, group_name: str) -> int:
    """DeepSpeed's MoE tags on every moe_dist expert parameter; returns how many were tagged."""
    count = 0
    for param in model.parameters():
        if is_expert_param(param):
            param.allreduce = False  # type: ignore[attr-defined]
            param.group_name = group_name  # type: ignore[attr-defined]
            count += 1
    return count


def init_deepspeed_comm(backend: str, local_rank: int) -> None:
    """Attach DeepSpeed's comm layer to the process group moe_dist already created.

    DeepSpeedEngine reads the local rank from ``os.environ['LOCAL_RANK']`` and nowhere else.
    torchrun and the deepspeed launcher set it; Slurm's srun and test harnesses do not, so the
    value moe_dist's launcher contract resolved (``LaunchEnv.local_rank``) is written there. A
    different value already there is a launcher inconsistency and is refused.
    """
    import deepspeed

    env_value = os.environ.get("LOCAL_RANK")
    if env_value is None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    elif int(env_value) != local_rank:
        raise RuntimeError(f"LOCAL_RANK={env_value} in the environment but the launcher contract resolved "
                           f"local rank {local_rank}; check the launcher's variables (moe-dist train --dry-run)")
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
