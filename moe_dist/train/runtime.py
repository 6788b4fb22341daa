"""Where the trainer meets the hardware and the launcher: device, process groups, mesh, the
collective watchdog, and the native engine's plan (``moe_dist.train.plan``), chosen here so the
trainer never branches on the world size.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_dist.config import Config, ConfigError, validate
from moe_dist.data import check_data
from moe_dist.distributed.launch_env import LaunchEnv
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.train.plan import GradientPlan, LocalPlan, parallelize

if TYPE_CHECKING:
    from moe_dist.distributed.agreement import CollectiveWatchdog

logger = logging.getLogger(__name__)


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

    def parallelize(self, model: nn.Module, cfg: Config) -> GradientPlan:
        """The native engine's plan: the identity alone; TP/EP + gradient hooks on a mesh, or
        FSDP2 with ``parallel.fsdp`` (bf16 parameters when training in bf16)."""
        if not self.distributed:
            return LocalPlan(model)
        return parallelize(model, self.mesh, cfg, record=self.watchdog.record if self.watchdog else None,
                           param_dtype=self.autocast_dtype(cfg.train.dtype))

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
    check_data(cfg.data, cfg.model.vocab_size)  # the source and tokenizer exist (no data is read)
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
