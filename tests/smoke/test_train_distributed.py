"""End-to-end distributed training through the real CLI on CPU gloo.

* ``torchrun --nproc_per_node 2 ... parallel.ep=2`` and ``--nproc_per_node 4 ... parallel.ep=4``
  log the same loss at every step as the single-process run (rel 1e-5), all with the fused AdamW
  clipping inside its step;
* a 2-process ep=2 run resumes the 4-process run's step-2 checkpoint (another layout) and
  continues on the single-process curve;
* a rank killed mid-run makes the other rank exit on its own, in bounded time, with the
  watchdog's message naming the last collective.

The ranks of the last test are started by hand with torchrun's environment variables, so that
the survivor must end itself (torchrun would tear it down on its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.smoke.conftest import REPO, TINY, read_metrics, run_train, train_env

pytestmark = pytest.mark.slow

# micro-batch 1 so that 1, 2 and 4 data-parallel ranks all divide the global batch of 4. The
# fused AdamW (CUDA's default, CPU's fused kernel here) clips inside its step: the single-process
# and the expert-parallel plans' grad_norm feed its grad_scale.
COMMON = ["train.micro_batch_size=1", "train.steps=4", "log.every=1", "train.eval_every=0",
          "checkpoint.every=2", "checkpoint.keep_last=2", "train.optimizer_impl=fused"]
REL = 1e-5


def _torchrun(nproc: int, run_dir: Path, *overrides: str, timeout: float = 240) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "moe_dist.cli", "train", "--run-dir", str(run_dir), *TINY, *overrides]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"torchrun x{nproc} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _assert_same_curve(got: dict[int, float], want: dict[int, float], what: str) -> None:
    assert got, f"{what}: no losses logged"
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=REL), f"{what}: step {step} loss {loss} != {want[step]}"


def test_ep2_and_ep4_match_single_process_and_resume_at_another_layout(tmp_path):
    run_train(tmp_path / "single", *COMMON)
    reference = _losses(tmp_path / "single")
    assert sorted(reference) == [1, 2, 3, 4]

    _torchrun(2, tmp_path / "ep2", *COMMON, "parallel.ep=2")
    _assert_same_curve(_losses(tmp_path / "ep2"), reference, "2 ranks, ep=2")
    assert sorted(_losses(tmp_path / "ep2")) == [1, 2, 3, 4]

    _torchrun(4, tmp_path / "ep4", *COMMON, "parallel.ep=4")
    _assert_same_curve(_losses(tmp_path / "ep4"), reference, "4 ranks, ep=4")
    saved = tmp_path / "ep4" / "checkpoints" / "step_00000002"
    assert (saved / ".metadata").is_file() and len(list(saved.glob("*.distcp"))) == 4

    _torchrun(2, tmp_path / "resumed", *COMMON, "parallel.ep=2", f"checkpoint.resume={saved}")
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4], resumed
    _assert_same_curve(resumed, reference, "2 ranks (ep=2) resumed from 4 ranks (ep=4)")


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return train_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                     GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_killed_rank_makes_the_other_exit_with_the_watchdog_message(tmp_path):
    from moe_dist.distributed.agreement import WATCHDOG_EXIT_CODE
    from moe_dist.distributed.launch_env import free_port

    run_dir = tmp_path / "run"
    timeout_s = 5
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "moe_dist.cli", "train", "--run-dir", str(run_dir), *TINY,
               "train.micro_batch_size=1", "train.steps=100000", "log.every=1", "train.eval_every=0",
               "checkpoint.every=2", "checkpoint.keep_last=1", "parallel.ep=2",
               f"parallel.collective_timeout_s={timeout_s}"]
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    ranks = [subprocess.Popen(command, cwd=REPO, env=_rank_env(r, port), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        first = run_dir / "checkpoints" / "step_00000002"
        deadline = time.monotonic() + 120
        while not first.exists() and time.monotonic() < deadline and all(p.poll() is None for p in ranks):
            time.sleep(0.05)
        assert first.exists(), "the run never reached its first checkpoint"
        os.kill(ranks[1].pid, signal.SIGKILL)  # rank 1 dies somewhere in a later step
        killed_at = time.monotonic()
        code = ranks[0].wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs[0].seek(0)
    output = logs[0].read()
    for log in logs:
        log.close()
    assert code == WATCHDOG_EXIT_CODE, f"rank 0 exited {code}:\n{output[-4000:]}"
    assert elapsed < timeout_s + 25, f"rank 0 took {elapsed:.1f}s to give up"
    assert "rank 0: training step" in output and "did not complete" in output, output[-4000:]
    assert f"parallel.collective_timeout_s={timeout_s}s" in output and "last collective #" in output, output[-4000:]
