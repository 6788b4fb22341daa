"""DeepSpeed ZeRO for moe_dist: the generated DeepSpeed config, dense/expert parameter groups, and
the bridge that puts moe_dist's own expert process groups into DeepSpeed's group registry.

This is the only module of moe_dist that imports ``deepspeed`` (STYLE §2.7). The training loop
that drives the engine is :mod:`moe_dist.train.zero_trainer`; users select it with
``train.engine=deepspeed`` and ``zero.stage=0|1|2`` (see docs/deepspeed.md).

How expert parallelism meets DeepSpeed (DeepSpeed's MoE conventions, moe_dist's groups)
---------------------------------------------------------------------------------------
1. :func:`apply_ep` slices every MoE layer's experts to this rank's block and installs the
   all-to-all dispatcher; moe_dist's mesh owns the ep and edp process groups.
2. :func:`register_expert_groups` stores *those same group objects* in
   ``deepspeed.utils.groups`` under the name ``ep_size_{ep}`` (DeepSpeed would otherwise create
   its own groups lazily; it never does here, because the name already exists).
3. :func:`tag_expert_params` marks each expert parameter ``allreduce=False`` and
   ``group_name='ep_size_{ep}'``; :func:`optimizer_param_groups` moves them into optimizer
   groups with ``moe=True`` and that name (``split_params_into_different_moe_groups_for_optimizer``).
4. :class:`ExpertParallelEngine` tells DeepSpeed that the model has MoE parameters (its own
   detection only recognises ``deepspeed.moe.layer.MoE`` modules), so the ZeRO optimizer reduces
   and partitions expert gradients and optimizer state over the expert-data-parallel group,
   divides expert gradients by the dp size (the same rule as moe_dist's GradReducer), and sums
   the expert part of the gradient norm once per expert.

Worked example, world 4, ``ep=2``: ep groups [0,1] [2,3], edp groups [0,2] [1,3]. Dense ZeRO
partitions span all 4 ranks; the partitions of expert 0's weights (held by ranks 0 and 2) span
[0,2]. ``ep=4``: ep group [0,1,2,3], edp groups of one rank each, so expert optimizer state is
not partitioned at all (each rank is the only holder of its experts).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_dist.config import Config, ConfigError, grad_accum_steps
from moe_dist.distributed.expert_parallel import is_expert_param
from moe_dist.train.optim import param_groups as weight_decay_groups

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_dist.distributed.mesh import ParallelMesh

logger = logging.getLogger(__name__)

GENERATED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16", "fp16", "zero_optimization", "optimizer", "scheduler",
                  "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer")
"""Top-level DeepSpeed keys moe_dist derives from its own config. ``zero.ds_config`` may not set
them: a second source of truth for the batch size or the optimizer is refused, not merged."""


# --------------------------------------------------------------------------------------------
# 1. The DeepSpeed config
# --------------------------------------------------------------------------------------------

def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's registry key of the expert groups of degree ``ep_size``."""
    return f"ep_size_{ep_size}"


def build_ds_config(cfg: Config, dp_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``dp_size`` data-parallel ranks.

    Optimizer and scheduler are *client* objects (torch AdamW and moe_dist's warm-up + cosine
    LambdaLR, built by :func:`build_engine`), so the config only allows them: DeepSpeed's own
    Adam types would JIT-compile C++/CUDA ops (FusedAdam, CPUAdam) that a CPU machine may not
    have, and the client AdamW makes the update identical to the native engine's.
    """
    train, zero = cfg.train, cfg.zero
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size),
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # moe_dist logs its own metrics
        "zero_optimization": {
            "stage": zero.stage,
            "overlap_comm": zero.overlap_comm,
            # DeepSpeed requires both for MoE parameter groups at stage 2.
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": zero.bucket_size,
            "allgather_bucket_size": zero.bucket_size,
        },
    }
    if zero.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # The client torch AdamW then runs on the CPU partitions; DeepSpeedCPUAdam would be faster
        # but needs the cpu_adam op built.
        ds["zero_force_ds_cpu_optimizer"] = False
    if zero.ds_config:
        ds = merge_user_config(ds, load_user_config(zero.ds_config))
    return ds


def load_user_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"zero.ds_config ({path!r}) is not a file; give the path of a DeepSpeed JSON "
                          "config holding only extra keys, or '' for none")
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"zero.ds_config ({path!r}) is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"zero.ds_config ({path!r}) must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def merge_user_config(generated: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Add the user's extra DeepSpeed keys; refuse any key moe_dist generates (no silent winner)."""
    clashes = sorted(k for k in user if k in GENERATED_KEYS)
    if clashes:
        where = {"train_batch_size": "train.global_batch_size",
                 "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                 "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x dp)",
                 "gradient_clipping": "train.grad_clip", "bf16": "train.dtype", "fp16": "train.dtype",
                 "zero_optimization": "zero.stage / zero.overlap_comm / zero.bucket_size / "
                                      "zero.offload_optimizer",
                 "optimizer": "train.lr / beta1 / beta2 / weight_decay",
                 "scheduler": "train.warmup_steps / min_lr_ratio"}
        fixes = "; ".join(f"{k} -> {where.get(k, 'generated by moe_dist')}" for k in clashes)
        raise ConfigError(f"zero.ds_config sets {clashes}, which moe_dist generates from its own config; "
                          f"remove them from the JSON and set the moe_dist keys instead ({fixes})")
    return {**generated, **user}


# --------------------------------------------------------------------------------------------
# 2. The group bridge and the expert parameter groups
# --------------------------------------------------------------------------------------------

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


def optimizer_param_groups(model: nn.Module, weight_decay: float, group_name: str | None) -> list[dict]:
    """moe_dist's weight-decay groups, with expert parameters split into ``moe=True`` groups.

    Without expert groups (``group_name`` None) these are exactly the native engine's groups.
    Empty groups are dropped (DeepSpeed flattens each group and rejects empty ones).
    """
    groups_ = weight_decay_groups(model, weight_decay)
    if group_name is not None:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups_ = split_params_into_different_moe_groups_for_optimizer(groups_)
    return [g for g in groups_ if g["params"]]


# --------------------------------------------------------------------------------------------
# 3. The engine
# --------------------------------------------------------------------------------------------

def _engine_class():
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """A DeepSpeedEngine that counts tagged expert parameters as MoE layers.

        DeepSpeed sets ``has_moe_layers`` only for its own ``MoE`` modules; with moe_dist's layers
        it would stay False and the ZeRO optimizer would partition expert state over the whole
        world, mixing different ranks' experts. Everything else is DeepSpeed's own code path.
        """

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if any(is_moe_param(p) for p in self.module.parameters()):
                self.has_moe_layers = True

    return ExpertParallelEngine


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


def build_engine(model: nn.Module, cfg: Config, mesh: ParallelMesh, *, bf16: bool, backend: str,
                 local_rank: int):
    """Wrap ``model`` (already expert-parallel: :func:`apply_ep` ran) in a DeepSpeed engine.

    Steps: attach DeepSpeed's comm layer to our process group, register our expert groups,
    tag expert params, build the torch AdamW with dense/expert groups, then the engine (which
    wraps AdamW in the ZeRO optimizer and drives the scheduler). Returns the engine.
    """
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig

    from moe_dist.train.optim import build_scheduler

    init_deepspeed_comm(backend, local_rank)
    group_name = register_expert_groups(mesh)
    if group_name is not None:
        tag_expert_params(model, group_name)
    train = cfg.train
    ds_config = build_ds_config(cfg, mesh.dp_size, bf16)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, train.weight_decay, group_name), lr=train.lr,
                                  betas=(train.beta1, train.beta2), eps=1e-8, foreach=False)
    config_class = DeepSpeedConfig(ds_config, None)
    set_optimizer_flags(config_class, model)
    engine = _engine_class()(args=None, model=model, optimizer=optimizer,
                             lr_scheduler=lambda opt: build_scheduler(opt, train),
                             dist_init_required=False, config=ds_config, config_class=config_class)
    if group_name is not None and not engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not register the expert parameters as MoE parameters; "
                           "check the deepspeed version (moe_dist was written against 0.19.8)")
    return engine
