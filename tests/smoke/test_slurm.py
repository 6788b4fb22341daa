"""slurm/*.sbatch on a real Slurm cluster (the local one from slurm/local/start.sh).

Skipped unless a cluster answers `sinfo`, or MOE_DIST_SLURM_TESTS=1 (then, as root, the local
cluster is started for the session and stopped afterwards). Every job uses 2 nodes x 1 task
(the local cluster emulates node1 and node2 on this machine) and trains configs/tiny.yaml on CPU.

- srun-direct.sbatch and train.sbatch finish a 3-step run with metrics, TensorBoard events and
  a checkpoint, and report the same rank layout in a dry run as a local torchrun.
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
                                 read_metrics, require_cli, run)

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


def sbatch(script: str, args: list[str], out_dir: Path, run_dir: Path, wait: bool,
           options: list[str] = LOCAL, timeout: float = 300) -> tuple[int, int, Path]:
    """Submit slurm/<script> from the repository root; returns (job id, sbatch exit code, log)."""
    log = out_dir / f"{script}.%j.out"
    cmd = ["sbatch", "--parsable", f"--output={log}", *options, *(["--wait"] if wait else []),
           str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(RUN_DIR=str(run_dir), MOE_DIST_ROOT=str(REPO)),
                          capture_output=True, text=True, timeout=timeout)
    match = re.search(r"^(\d+)", proc.stdout, re.M)
    assert match, f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}"
    job_id = int(match.group(1))
    return job_id, proc.returncode, Path(str(log).replace("%j", str(job_id)))


def job_fields(job_id: int) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                          text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def log_text(log: Path) -> str:
    return log.read_text() if log.is_file() else f"(no log at {log})"


@pytest.mark.parametrize("script", ["srun-direct.sbatch", "train.sbatch"])
def test_sbatch_trains_two_ranks_on_two_nodes(slurm_cluster, script: str, tmp_path: Path) -> None:
    require_cli()
    run_dir = tmp_path / "run"
    job_id, rc, log = sbatch(script, TINY, tmp_path, run_dir, wait=True)
    assert rc == 0, f"job {job_id} failed:\n{log_text(log)[-6000:]}"
    check_tiny_run(run_dir)
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    text = log_text(log)
    assert f"job {job_id} " in text and "node1" in text and "step ended with exit code 0" in text


def test_srun_direct_dry_run_layout_matches_torchrun(slurm_cluster, tmp_path: Path) -> None:
    require_cli()
    args = ["--dry-run", *TINY, "parallel.ep=2"]  # flags before overrides (argparse)
    local = run([str(LAUNCH / "torchrun.sh"), *args], timeout=120, NPROC="2")
    assert local.returncode == 0, explain(local)
    job_id, rc, log = sbatch("srun-direct.sbatch", args, tmp_path, tmp_path / "run", wait=True)
    assert rc == 0, f"job {job_id} failed:\n{log_text(log)[-6000:]}"
    expected = layout_lines(local.stdout)
    assert expected, explain(local)
    assert layout_lines(log_text(log)) == expected


def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    require_cli()
    steps = 300  # ~15-40 ms each: long enough to signal the job mid-run
    run_dir = tmp_path / "run"
    args = [arg if not arg.startswith("train.steps=") else f"train.steps={steps}" for arg in TINY]
    job_id, rc, log = sbatch("srun-direct.sbatch", args, tmp_path, run_dir, wait=False)
    assert rc == 0, f"sbatch failed for job {job_id}"
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
        #    make it eligible at once, then wait for the resumed run to finish
        deadline = time.monotonic() + 300
        released = False
        while True:
            fields = job_fields(job_id)
            state, restarts = fields["JobState"], int(fields.get("Restarts", "0"))
            if state == "PENDING" and restarts >= 1 and not released:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                               timeout=10)
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
    assert "batch shell got SIGUSR1" in text and "step ended with exit code 124" in text, text[-6000:]
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
