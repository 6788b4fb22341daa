"""config -> launcher env -> mesh -> trainer: what ``moe-dist train`` runs on every rank."""

from __future__ import annotations

import logging
from pathlib import Path

from moe_dist.config import Config, ConfigError, validate
from moe_dist.distributed.mesh import MeshLayout
from moe_dist.train.memory import GIB, estimate_memory
from moe_dist.train.summary import run_summary, schedule_warnings
from moe_dist.train.run_dir import default_run_dir, prepare_run_dir
from moe_dist.train.runtime import Runtime, build_runtime, shutdown

logger = logging.getLogger(__name__)

DOES_NOT_FIT_EXIT_CODE = 3


def init_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, every line prefixed with the rank."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"))


def plan_launch(cfg: Config, world_size: int, device_memory_gib: float | None = None,
                describe_ranks: bool = True) -> int:
    """``--dry-run --world-size N``: validate ``cfg`` for N ranks, print the rank layout and the
    per-rank memory estimate, start nothing. Returns 0, or 3 when the estimate exceeds the device."""
    validate(cfg, world_size)
    layout = MeshLayout.from_config(cfg.parallel, world_size)
    if describe_ranks:
        print(layout.describe(cfg.moe.num_experts if cfg.moe.enabled else None))
    device_memory = device_memory_gib * GIB if device_memory_gib is not None else _visible_device_memory()
    estimate = estimate_memory(cfg, world_size, device_memory, cfg.train.activation_checkpointing)
    print(run_summary(cfg, world_size, estimate))
    print(estimate.describe())
    for warning in schedule_warnings(cfg):
        logger.warning(warning)
    if estimate.fits is False:
        logger.warning("the estimate (%.1f GiB per rank) exceeds the device memory (%.1f GiB): use more ranks "
                       "(parallel.ep / dp with zero.stage), train.activation_checkpointing, a smaller "
                       "train.micro_batch_size, or zero.offload_optimizer", estimate.total / GIB,
                       device_memory / GIB)
        return DOES_NOT_FIT_EXIT_CODE
    return 0


def _visible_device_memory() -> float | None:
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def run_training(cfg: Config, config_path: str | None = None, run_dir: str | Path | None = None,
                 overwrite: bool = False, dry_run: bool = False, device_memory_gib: float | None = None) -> int:
    runtime = build_runtime(cfg)
    init_logging(runtime.env.rank)
    try:
        if dry_run:
            if runtime.is_logging_rank:
                print(runtime.mesh.describe(cfg.moe.num_experts if cfg.moe.enabled else None))
                return plan_launch(cfg, runtime.env.world_size, device_memory_gib, describe_ranks=False)
            return 0
        directory = Path(run_dir) if run_dir else default_run_dir(config_path)
        return train_in_run_dir(cfg, runtime, directory, overwrite)
    finally:
        shutdown(runtime)


def train_in_run_dir(cfg: Config, runtime: Runtime, directory: Path, overwrite: bool) -> int:
    """Prepare ``directory``, train with the engine ``train.engine`` names, return the exit code
    (``PREEMPTED_EXIT_CODE`` when a signal stopped the run early)."""
    from moe_dist.train.trainer import PREEMPTED_EXIT_CODE

    if cfg.train.engine == "deepspeed":  # imported only when chosen: deepspeed is slow to import
        from moe_dist.train.engines.deepspeed import DeepSpeedTrainer as trainer_cls
    else:
        from moe_dist.train.engines.native import NativeTrainer as trainer_cls
    failure: Exception | None = None
    if runtime.is_logging_rank:
        try:
            prepare_run_dir(directory, cfg, overwrite, is_writer=True)
        except (ConfigError, OSError) as exc:
            failure = exc
    # Instead of a barrier: every rank learns that rank 0 failed and stops too, instead of
    # waiting in the first collective of a trainer that rank 0 never builds.
    if runtime.any_rank(failure is not None):
        if failure is not None:
            raise failure
        raise ConfigError(f"rank 0 could not prepare the run directory {directory}; its message says why")
    result = trainer_cls(cfg, directory, runtime).fit()
    if runtime.is_logging_rank:
        logger.info("finished at step %d (%s engine): loss %s, val_loss %s; run directory %s", result.final_step,
                    cfg.train.engine, _fmt(result.last_loss), _fmt(result.last_val_loss), directory)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
