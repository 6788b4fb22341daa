"""Where the trainer meets the hardware and the launcher: device, process groups, mesh and the
parallel plan.

The trainer talks to a *plan* with one small interface (gradient sync, clipping, loss,
reductions, checkpoint payloads). :class:`LocalPlan` is the single-process plan; the
distributed one comes from ``moe_dist.distributed.parallelize``. Both are built here so the
trainer never branches on the world size.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_dist.config import Config, ConfigError, validate
from moe_dist.distributed.launch_env import LaunchEnv
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.models.cross_entropy import token_cross_entropy

if TYPE_CHECKING:
    from moe_dist.distributed.agreement import CollectiveWatchdog

logger = logging.getLogger(__name__)


class LocalPlan:
    """Single process: every reduction is the identity."""

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_sync(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=False)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy(logits, targets)  # fused on CUDA; F.cross_entropy in fp32 elsewhere

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    sum_over_token_ranks = None  # expert-load counters need no reduction

    def after_optimizer_step(self, model: nn.Module) -> None:
        from moe_dist.moe.balance import update_selection_bias_from_stats

        update_selection_bias_from_stats(model, reduce_fn=None)

    # The same DCP format as every distributed layout, so checkpoints move between them.
    def save_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        from moe_dist.distributed import checkpoint as dist_checkpoint

        dist_checkpoint.save_model_and_optimizer(directory, model, optimizer, ParallelMesh.single())

    def load_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        from moe_dist.distributed import checkpoint as dist_checkpoint

        dist_checkpoint.load_model_and_optimizer(directory, model, optimizer, ParallelMesh.single())

    def attach(self, model: nn.Module) -> LocalPlan:
        self.model = model
        return self


@dataclass
class Runtime:
    env: LaunchEnv
    mesh: ParallelMesh
    device: torch.device
    watchdog: CollectiveWatchdog | None = None
    """Bounds each training step's collectives (distributed runs; None for one process). Its
    ``record`` is handed to the dispatchers, so a hang names the last split sizes."""

    @property
    def is_logging_rank(self) -> bool:
        return self.env.rank == 0

    @property
    def is_data_builder(self) -> bool:
        return self.env.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            from moe_dist.distributed import comms

            comms.barrier(comms.world_group())

    def any_rank(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        from moe_dist.distributed import comms

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(comms.all_reduce(value, "max", comms.world_group()).item() > 0)

    def parallelize(self, model: nn.Module, cfg: Config):
        if not self.distributed:
            return LocalPlan().attach(model)
        from moe_dist.distributed.parallelize import parallelize

        return parallelize(model, self.mesh, cfg, record=self.watchdog.record if self.watchdog else None)

    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Run ``what`` (a training step) under the collective watchdog; a no-op alone."""
        return self.watchdog.guard(what) if self.watchdog else contextlib.nullcontext()

    def agree_before_training(self, model: nn.Module, cfg: Config) -> None:
        if self.distributed:
            from moe_dist.distributed.agreement import agree_before_training

            agree_before_training(model, cfg, self.mesh, self.watchdog.record if self.watchdog else None)

    def autocast_dtype(self, dtype: str) -> torch.dtype | None:
        if dtype == "fp32" or (dtype == "auto" and self.device.type != "cuda"):
            return None
        return torch.bfloat16

    def autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def pick_device(requested: str, env: LaunchEnv) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def build_runtime(cfg: Config, env: LaunchEnv | None = None) -> Runtime:
    """Read the launcher, validate the config for this world size, create groups and the mesh."""
    env = env or LaunchEnv.from_environ()
    validate(cfg, env.world_size)  # on every rank, before any collective
    device = pick_device(cfg.train.device, env)
    if env.world_size == 1:
        return Runtime(env, ParallelMesh.single(), device)
    from moe_dist.distributed.launch_env import init_process_group
    from moe_dist.distributed.mesh import build_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    init_process_group(env, backend=backend, timeout=cfg.parallel.collective_timeout_s)
    mesh = build_mesh(cfg.parallel, env.world_size, device.type)
    from moe_dist.distributed.agreement import CollectiveWatchdog
    from moe_dist.distributed.comms import CollectiveRecord

    watchdog = CollectiveWatchdog(cfg.parallel.collective_timeout_s, CollectiveRecord(), env.rank)
    return Runtime(env, mesh, device, watchdog)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed:
        from moe_dist.distributed import comms

        comms.barrier(comms.world_group())
        comms.destroy()
