"""Shared helpers for end-to-end runs of `moe-dist train` (tiny models, seconds each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a handful of steps take a second or two on CPU.
TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
    "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32",
    "data.seq_len=32", "data.max_documents=2",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
    "train.eval_batches=2", "log.progress_bar=false",
]


def train_env(**extra):
    env = dict(os.environ)
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def train_command(run_dir, *overrides, extra_args=()):
    return [sys.executable, "-m", "moe_dist.cli", "train", "--run-dir", str(run_dir), *extra_args,
            *TINY, *overrides]


def run_train(run_dir, *overrides, extra_args=(), timeout=240, check=True):
    result = subprocess.run(train_command(run_dir, *overrides, extra_args=extra_args), cwd=REPO,
                            env=train_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"moe-dist train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
