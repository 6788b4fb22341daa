"""What a run is, in two lines: printed at start-up on rank 0 and by ``--dry-run``.

    model: 0.948 B parameters (0.325 B active per token), 0.948 B on each rank
    batch: 64 sequences per step = micro-batch 8 x 8 accumulation steps x dp 1; 131,072 tokens per step
"""

from __future__ import annotations

from moe_dist.config import Config, grad_accum_steps
from moe_dist.distributed.mesh import MeshLayout
from moe_dist.train.memory import MemoryEstimate


def _count(value: int) -> str:
    return f"{value / 1e9:.3f} B" if value >= 1e8 else f"{value / 1e6:.2f} M"


def run_summary(cfg: Config, world_size: int, estimate: MemoryEstimate) -> str:
    layout = MeshLayout.from_config(cfg.parallel, world_size)
    accum = grad_accum_steps(cfg, layout.dp)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return (f"model: {_count(estimate.total_params)} parameters ({_count(estimate.active_params)} active per "
            f"token), {_count(estimate.rank_params)} on each rank\n"
            f"batch: {cfg.train.global_batch_size} sequences per step = micro-batch {cfg.train.micro_batch_size}"
            f" x {accum} accumulation steps x dp {layout.dp}; {tokens:,} tokens per step")


def schedule_warnings(cfg: Config) -> list[str]:
    """Settings the run accepts but cannot reach as configured."""
    train, warnings = cfg.train, []
    if train.warmup_steps >= train.steps:
        warnings.append(f"train.warmup_steps ({train.warmup_steps}) >= train.steps ({train.steps}): the learning "
                        f"rate never reaches train.lr ({train.lr}); lower warmup_steps or raise steps")
    if train.eval_every > train.steps:
        warnings.append(f"train.eval_every ({train.eval_every}) > train.steps ({train.steps}): validation runs "
                        "only at the end")
    if cfg.checkpoint.every > train.steps:
        warnings.append(f"checkpoint.every ({cfg.checkpoint.every}) > train.steps ({train.steps}): only the final "
                        "checkpoint is written")
    return warnings
