"""slurm/*.sbatch on a real Slurm cluster (the local one from slurm/local/start.sh).

Skipped unless a cluster answers `sinfo`, or MOE_DIST_SLURM_TESTS=1 (then, as root, the local
cluster is started for the session and stopped afterwards). Every job uses 2 nodes x 1 task
(the local cluster emulates node1 and node2 on this machine) and trains configs/tiny.yaml on CPU.

- srun-direct.sbatch and train.sbatch finish a 3-step run with metrics, TensorBoard events and
  a checkpoint; they and deepspeed.sbatch report the same rank layout in a dry run as a local
  torchrun.
- A job whose batch shell gets SIGUSR1 (what `#SBATCH --signal=B:USR1@T` sends) checkpoints,
  requeues itself and resumes from that checkpoint; the finished run has every step once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_launch_scripts import (LAUNCH, REPO, TINY, check_tiny_run, clean_env, explain, layout_lines,
                                 read_metrics, run)

pytestmark = pytest.mark.slow

# The local cluster has no GPUs and 2 CPUs per node: override the scripts' GPU-cluster defaults.
LOCAL = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True,
                              timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and proc.stdout.strip() != ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster to submit to; started (and later stopped) here only when asked to."""
    if _sinfo_answers():
        yield
        return
    if os.environ.get("MOE_DIST_SLURM_TESTS") != "1":
        pytest.skip("no Slurm cluster answers `sinfo`; run `sudo slurm/local/start.sh` or set "
                    "MOE_DIST_SLURM_TESTS=1 (as root) to start one")
    if os.geteuid() != 0:
        pytest.fail("MOE_DIST_SLURM_TESTS=1 but not root: slurm/local/start.sh installs packages "
                    "and starts daemons; run it with sudo first")
    started = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"slurm/local/start.sh failed:\n{proc.stderr[-4000:]}"
    print(f"local Slurm cluster started in {time.monotonic() - started:.1f} s")
    yield
    subprocess.run(["bash", str(REPO / "slurm/local/stop.sh")], capture_output=True, timeout=120)


def sbatch(script: str, args: list[str], out_dir: Path, run_dir: Path,
           options: list[str] = LOCAL) -> tuple[int, Path]:
    """Submit slurm/<script> from the repository root; returns (job id, its log file)."""
    log = out_dir / f"{script}.%j.out"
    cmd = ["sbatch", "--parsable", f"--output={log}", *options, str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(RUN_DIR=str(run_dir), MOE_DIST_ROOT=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"^(\d+)", proc.stdout, re.M)
    assert proc.returncode == 0 and match, f"sbatch failed: {proc.stdout!r} {proc.stderr!r}"
    job_id = int(match.group(1))
    return job_id, Path(str(log).replace("%j", str(job_id)))


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def wait_job(job_id: int, log: Path, timeout: float = 300) -> int:
    """Poll until the job ends (faster than `sbatch --wait`, which backs off); its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return int(fields.get("ExitCode", "0:0").split(":")[0])
        assert time.monotonic() < deadline, f"job {job_id} still {fields['JobState']}:\n{log_text(log)[-6000:]}"
        time.sleep(0.5)


def job_fields(job_id: int) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                          text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def log_text(log: Path) -> str:
    return log.read_text() if log.is_file() else f"(no log at {log})"


@pytest.mark.parametrize("script", ["srun-direct.sbatch", "train.sbatch"])
def test_sbatch_trains_two_ranks_on_two_nodes(slurm_cluster, script: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id, log = sbatch(script, TINY, tmp_path, run_dir)
    assert wait_job(job_id, log) == 0, f"job {job_id} failed:\n{log_text(log)[-6000:]}"
    check_tiny_run(run_dir)
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    text = log_text(log)
    assert f"job {job_id} " in text and "node1" in text and "step ended with exit code 0" in text


DRY_RUN = ["--dry-run", *TINY, "parallel.ep=2"]  # flags before overrides (argparse)


@pytest.fixture(scope="module")
def torchrun_layout() -> list[str]:
    """The rank layout a local 2-process torchrun prints for DRY_RUN."""
    local = run([str(LAUNCH / "torchrun.sh"), *DRY_RUN], timeout=120, NPROC="2")
    assert local.returncode == 0, explain(local)
    layout = layout_lines(local.stdout)
    assert len(layout) > 2, explain(local)
    return layout


@pytest.mark.parametrize("script", ["srun-direct.sbatch", "train.sbatch", "deepspeed.sbatch"])
def test_dry_run_layout_matches_local_torchrun(slurm_cluster, torchrun_layout: list[str], script: str,
                                               tmp_path: Path) -> None:
    job_id, log = sbatch(script, DRY_RUN, tmp_path, tmp_path / "run")
    assert wait_job(job_id, log) == 0, f"job {job_id} failed:\n{log_text(log)[-6000:]}"
    assert layout_lines(log_text(log)) == torchrun_layout


@pytest.mark.parametrize("script", ["srun-direct.sbatch", "train.sbatch"])
def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, script: str, tmp_path: Path) -> None:
    """srun-direct: the trainers get SIGUSR1 from srun; train.sbatch: torchrun sits in between."""
    steps = 300  # ~15-40 ms each: long enough to signal the job mid-run
    run_dir = tmp_path / "run"
    args = [arg if not arg.startswith("train.steps=") else f"train.steps={steps}" for arg in TINY]
    job_id, log = sbatch(script, args, tmp_path, run_dir)
    try:
        # 1. let it train a little, then signal the batch shell as --signal=B:USR1@T would
        deadline = time.monotonic() + 180
        while True:
            rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            if any(r.get("step", 0) >= 2 for r in rows):
                break
            state = job_fields(job_id)["JobState"]
            assert state in ("PENDING", "RUNNING"), f"job {job_id} {state}:\n{log_text(log)[-6000:]}"
            assert time.monotonic() < deadline, f"no step 2 after 180 s:\n{log_text(log)[-6000:]}"
            time.sleep(0.5)
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], check=True, timeout=10)

        # 2. the job requeues itself; Slurm holds a requeued job ~2 min (Reason=BeginTime), so
        #    make it eligible sooner, then wait for the resumed run to finish. Not at once: the
        #    slurmds revoke the old run's job credential, and a relaunch within the same second
        #    fails with "Job credential revoked" (seen here) - so release it 3 s after the requeue.
        deadline = time.monotonic() + 300
        pending_since = None
        released = False
        while True:
            fields = job_fields(job_id)
            state, restarts = fields["JobState"], int(fields.get("Restarts", "0"))
            if state == "PENDING" and restarts >= 1 and not released:
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since >= 3:
                    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                   check=True, timeout=10)
                    released = True
            if state == "COMPLETED" and restarts >= 1:
                break
            assert state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "COMPLETED"), \
                f"job {job_id} {state}:\n{log_text(log)[-6000:]}"
            assert state != "COMPLETED", f"job finished without a requeue:\n{log_text(log)[-6000:]}"
            assert time.monotonic() < deadline, f"job {job_id} stuck in {state}:\n{log_text(log)[-6000:]}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=10)

    text = log_text(log)
    assert "batch shell got SIGUSR1" in text and "after SIGUSR1" in text, text[-6000:]
    if script == "srun-direct.sbatch":  # torchrun itself exits 1 (SignalException) after its workers
        assert "step ended with exit code 124" in text, text[-6000:]
    for rank in (0, 1):  # under torchrun a worker may get it twice (slurmstepd and torchrun)
        assert f"[rank {rank}]" in text and re.search(rf"\[rank {rank}\].*received signal 10", text), \
            f"rank {rank} never saw SIGUSR1:\n{text[-6000:]}"
    assert f"requeueing job {job_id}" in text and "restart 1:" in text, text[-6000:]
    resumed = re.search(r"resumed from \S*step_(\d+) at step (\d+)", text)
    assert resumed, f"the requeued run did not resume from a checkpoint:\n{text[-6000:]}"
    stopped_at = int(resumed.group(2))
    assert 2 <= stopped_at < steps
    # every step logged exactly once: the second run continued where the first one stopped
    logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert f"step_{steps:08d}" in kept
