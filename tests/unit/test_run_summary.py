"""Start-up summary, schedule warnings and the per-step text line (moe_dist/train/summary.py,
moe_dist/metrics/progress.py)."""

import io

from moe_dist.config import load_config
from moe_dist.metrics.progress import build_progress, format_step_line
from moe_dist.train.memory import estimate_memory
from moe_dist.train.summary import run_summary, schedule_warnings


def test_summary_names_parameters_accumulation_and_tokens():
    cfg = load_config(None, ["parallel.ep=2", "train.global_batch_size=32", "train.micro_batch_size=4"])
    text = run_summary(cfg, 2, estimate_memory(cfg, 2))
    assert "active per token" in text and "on each rank" in text
    assert "32 sequences per step = micro-batch 4 x 4 accumulation steps x dp 2; 4,096 tokens per step" in text


def test_schedule_the_run_cannot_reach_is_warned():
    cfg = load_config(None, ["train.steps=20", "train.warmup_steps=100", "checkpoint.every=50"])
    warnings = schedule_warnings(cfg)
    assert any("train.warmup_steps (100) >= train.steps (20)" in w for w in warnings)
    assert any("checkpoint.every (50) > train.steps (20)" in w for w in warnings)
    assert schedule_warnings(load_config(None, [])) == []


def test_step_line_and_no_bar_without_a_terminal():
    line = format_step_line(20, 250, {"train/loss": 3.54601, "train/lr": 3e-3, "train/grad_norm": 0.5,
                                      "perf/tokens_per_s": 12345.0, "perf/mfu": 0.123,
                                      "perf/peak_memory_gib": 10.25, "val/loss": 3.6})
    assert line == ("step 20/250 | loss 3.5460 | val_loss 3.6000 | lr 3.00e-03 | grad_norm 0.500 | 12.35k tok/s"
                    " | mfu 12.3% | peak mem 10.25 GiB")
    cfg = load_config(None, [])
    assert not build_progress(cfg.log, 10, 0, True, file=io.StringIO()).enabled  # a pipe or a file

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert build_progress(cfg.log, 10, 0, True, file=Terminal()).enabled
    assert not build_progress(cfg.log, 10, 0, False, file=Terminal()).enabled  # not the logging rank
