"""config -> launcher env -> mesh -> trainer: what ``moe-dist train`` runs on every rank."""

from __future__ import annotations

import logging
from pathlib import Path

from moe_dist.config import Config
from moe_dist.train.run_dir import default_run_dir, prepare_run_dir
from moe_dist.train.runtime import Runtime, build_runtime, shutdown

logger = logging.getLogger(__name__)


def init_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, every line prefixed with the rank."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"))


def run_training(cfg: Config, config_path: str | None = None, run_dir: str | Path | None = None,
                 overwrite: bool = False, dry_run: bool = False) -> int:
    runtime = build_runtime(cfg)
    init_logging(runtime.env.rank)
    try:
        if dry_run:
            if runtime.is_logging_rank:
                print(runtime.mesh.describe(cfg.moe.num_experts if cfg.moe.enabled else None))
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
    if runtime.is_logging_rank:
        prepare_run_dir(directory, cfg, overwrite, is_writer=True)
    runtime.barrier()
    result = trainer_cls(cfg, directory, runtime).fit()
    if runtime.is_logging_rank:
        logger.info("finished at step %d (%s engine): loss %s, val_loss %s; run directory %s", result.final_step,
                    cfg.train.engine, _fmt(result.last_loss), _fmt(result.last_val_loss), directory)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
