"""DeepSpeed engine end to end on 2 gloo ranks (ZeRO-2, ep=2): ``train_in_run_dir`` with train.engine=deepspeed trains a tiny
MoE LM on the bundled corpus, checkpoints through ``engine.save_checkpoint``, and a second run
resumed from the step-2 checkpoint logs the same losses for steps 3 and 4 as the first run.

Comparison: exact up to float rounding (rel 1e-6). Steps 3-4 of the resumed run read the same
rows, start from the saved fp32 master weights, Adam moments and scheduler position, and use the
saved expert shards of each ep rank (rank 1's experts are not in DeepSpeed's module file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import run_distributed
from test_zero import skip_shm_build

TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
    "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32",
    "data.seq_len=32", "data.max_documents=2",
    "train.global_batch_size=4", "train.micro_batch_size=1", "train.warmup_steps=2", "train.steps=4",
    "train.eval_every=0", "train.engine=deepspeed", "train.device=cpu",
    "parallel.ep=2", "zero.stage=2", "checkpoint.every=2", "checkpoint.keep_last=3",
    "log.every=1", "log.progress_bar=false", "log.tensorboard=false",
]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["train/loss"] if "train/loss" in r else r["loss"] for r in records
            if "train/loss" in r or "loss" in r}


def resume_round_trip(rank: int, world_size: int, run_dir: str, cache_dir: str) -> dict:
    import torch.distributed as dist

    from moe_dist.config import load_config
    from moe_dist.distributed.launch_env import LaunchEnv
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.entry import train_in_run_dir
    from moe_dist.train.runtime import Runtime

    skip_shm_build()
    run_path = Path(run_dir)
    cfg = load_config(None, TINY + [f"data.cache_dir={cache_dir}"])
    env = LaunchEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, node_rank=0,
                    master_addr="127.0.0.1", master_port=29500, launcher="torchrun")
    runtime = Runtime(env, build_mesh(cfg, world_size, "cpu"), torch_device())
    assert train_in_run_dir(cfg, runtime, run_path, overwrite=False) == 0
    dist.barrier()
    out: dict = {}
    if rank == 0:
        checkpoints = run_path / "checkpoints"
        out["first"] = _losses(run_path)
        out["latest"] = (checkpoints / "latest").read_text()
        out["dirs"] = sorted(p.name for p in checkpoints.iterdir())
        out["files"] = sorted(p.name for p in (checkpoints / "step_00000002").iterdir())
    dist.barrier()
    # A second run on the same process group and mesh, resumed from the step-2 checkpoint.
    resumed = load_config(None, TINY + [f"data.cache_dir={cache_dir}",
                                        f"checkpoint.resume={run_path / 'checkpoints' / 'step_00000002'}"])
    assert train_in_run_dir(resumed, runtime, run_path, overwrite=False) == 0
    dist.barrier()
    if rank == 0:
        out["second"] = _losses(run_path)
    return out


def torch_device():
    import torch

    return torch.device("cpu")


def test_deepspeed_checkpoint_resume_gives_the_same_next_losses(tmp_path):
    results = run_distributed(resume_round_trip, 2, str(tmp_path / "run"), str(tmp_path / "cache"), timeout=240)
    out = results[0]
    first, second = out["first"], out["second"]
    assert sorted(first) == [1, 2, 3, 4], first
    assert sorted(second) == [1, 2, 3, 4], second  # steps 1-2 kept, 3-4 re-logged after resume
    for step in (3, 4):
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), (step, first, second)
    assert first[4] != first[3]  # the model does change between steps
    assert out["latest"] == "step_00000004"
    assert [d for d in out["dirs"] if d.startswith("step_")] == ["step_00000002", "step_00000004"]
    files = out["files"]
    assert {"manifest.json", "config.yaml", "experts_ep000.pt", "experts_ep001.pt",
            "mp_rank_00_model_states.pt"} <= set(files), files
    assert sum(name.startswith("zero_pp_rank_") for name in files) == 2, files  # one optimizer shard per rank
