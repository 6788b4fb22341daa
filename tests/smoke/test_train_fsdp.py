"""``parallel.fsdp=true`` through the real CLI on CPU gloo: ``torchrun --nproc_per_node 2 ...
parallel.ep=2 parallel.fsdp=true`` (with activation checkpointing) logs the single process's loss
at every step (rel 1e-5), which exercises ``Runtime.parallelize`` choosing the FSDP plan, the
trainer's step, logging, evaluation and the checkpoint the run writes at its end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.smoke.conftest import REPO, TINY, read_metrics, run_train, train_env

pytestmark = pytest.mark.slow

COMMON = ["train.micro_batch_size=1", "train.steps=3", "log.every=1", "train.eval_every=3",
          "checkpoint.every=0"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_fsdp_with_ep2_matches_the_single_process_curve(tmp_path):
    run_train(tmp_path / "single", *COMMON)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "moe_dist.cli", "train", "--run-dir", str(tmp_path / "fsdp"), *TINY, *COMMON,
               "parallel.ep=2", "parallel.fsdp=true", "train.activation_checkpointing=selective"]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        pytest.fail(f"torchrun x2 failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    reference, got = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert sorted(got) == sorted(reference) == [1, 2, 3]
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}: {loss} != {reference[step]}"
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000003" / ".metadata").is_file()
