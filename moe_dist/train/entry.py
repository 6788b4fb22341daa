"""config -> launcher env -> mesh -> trainer: what ``moe-dist train`` runs on every rank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from moe_dist.config import Config, ConfigError, validate
from moe_dist.distributed.mesh import MeshLayout
from moe_dist.train.memory import GIB, estimate_memory
from moe_dist.train.summary import run_summary, schedule_warnings
from moe_dist.train.provenance import append_provenance, collect_provenance
from moe_dist.train.run_dir import default_run_dir, prepare_run_dir, write_run_config
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
                       "train.micro_batch_size, zero.offload_optimizer (DeepSpeed) or train.offload_optimizer "
                       "(native, one process)", estimate.total / GIB,
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
    (``PREEMPTED_EXIT_CODE`` when a signal stopped the run early).

    The run is recorded in ``directory`` (config.yaml, a provenance.json entry) only once data,
    model and the resumed checkpoint are in place: a run that fails before leaves no identity
    behind to refuse the corrected command with."""
    from moe_dist.train.trainer import PREEMPTED_EXIT_CODE

    if cfg.train.engine == "deepspeed":  # imported only when chosen: deepspeed is slow to import
        from moe_dist.train.engines.deepspeed import DeepSpeedTrainer as trainer_cls
    else:
        from moe_dist.train.engines.native import NativeTrainer as trainer_cls
    _on_rank_0(runtime, f"prepare the run directory {directory}",
               lambda: prepare_run_dir(directory, cfg, overwrite, is_writer=True))
    identity = cfg.to_yaml()  # as loaded: the trainer later resolves model.vocab_size=0 from the data

    def record_start(step: int) -> None:
        def write() -> None:
            write_run_config(directory, identity)
            append_provenance(directory, collect_provenance(runtime.mesh.layout, step, runtime.env.launcher,
                                                            cfg.train.engine, runtime.device))
        _on_rank_0(runtime, f"record the run in {directory}", write)

    result = trainer_cls(cfg, directory, runtime).fit(on_start=record_start)
    if runtime.is_logging_rank:
        _report_end(cfg, directory, result)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def _on_rank_0(runtime: Runtime, what: str, action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0; every rank raises if it failed there.

    Instead of a barrier: every rank learns that rank 0 failed and stops too, instead of
    waiting in the next collective, which rank 0 never reaches."""
    failure: Exception | None = None
    if runtime.is_logging_rank:
        try:
            action()
        except (ConfigError, OSError) as exc:
            failure = exc
    if runtime.any_rank(failure is not None):
        if failure is not None:
            raise failure
        raise ConfigError(f"rank 0 could not {what}; its message says why")


def _report_end(cfg: Config, directory: Path, result) -> None:
    """The last line of a run: finished, preempted (to be resumed) or complete before it started."""
    if result.already_complete:
        last = _last_logged(directory)
        logger.info("nothing to train: this run is already complete at step %d (train.steps=%d)%s; run directory "
                    "%s. Raise train.steps to train further, or pass --run-dir NEW_DIR for a new run",
                    result.final_step, cfg.train.steps, last, directory)
    elif result.preempted:
        logger.info("preempted at step %d (checkpoint saved); rerun the same command to resume; run directory %s",
                    result.final_step, directory)
    else:
        logger.info("finished at step %d (%s engine): loss %s, val_loss %s; run directory %s", result.final_step,
                    cfg.train.engine, _fmt(result.last_loss), _fmt(result.last_val_loss), directory)


def _last_logged(directory: Path) -> str:
    """', last logged loss X, val_loss Y' from metrics.jsonl (what it holds of the two), or ''."""
    from moe_dist.metrics.sink import read_metrics

    try:
        records = read_metrics(directory / "metrics.jsonl")
    except (OSError, ValueError):
        return ""
    loss = next((r["loss"] for r in reversed(records.values()) if r.get("loss") is not None), None)
    val = next((r["val_loss"] for r in reversed(records.values()) if r.get("val_loss") is not None), None)
    text = f", last logged loss {_fmt(loss)}" if loss is not None else ""
    return text + (f", val_loss {_fmt(val)}" if val is not None else "")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
