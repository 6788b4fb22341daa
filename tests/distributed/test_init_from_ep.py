"""``model.init_from`` under expert parallelism (2 gloo ranks, ep=2, native engine): every rank
reads a dense Hugging Face Llama, copy-upcycles it and keeps its own experts; the first-step loss
equals the dense model's in one process (relative 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import run_distributed

transformers = pytest.importorskip("transformers")

RUN = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
       "model.norm_eps=1e-5", "moe.every=1", "data.seq_len=32", "data.max_documents=2",
       "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=1", "train.eval_every=0",
       "checkpoint.every=0", "log.every=1", "log.progress_bar=false", "log.tensorboard=false", "train.device=cpu"]


def first_step_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r["lm_loss"] for r in records if r.get("step") == 1)


def train_ep(rank: int, world_size: int, run_dir: str, overrides: list[str]) -> float | None:
    from moe_dist.config import load_config
    from moe_dist.distributed.launch_env import LaunchEnv
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.entry import train_in_run_dir
    from moe_dist.train.runtime import Runtime

    cfg = load_config(None, overrides)
    env = LaunchEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, node_rank=0,
                    master_addr="127.0.0.1", master_port=29500, launcher="torchrun")
    runtime = Runtime(env, build_mesh(cfg, world_size, "cpu"), torch.device("cpu"))
    assert train_in_run_dir(cfg, runtime, Path(run_dir), overwrite=False) == 0
    return first_step_loss(Path(run_dir)) if rank == 0 else None


def test_upcycling_under_expert_parallelism_starts_at_the_dense_loss(tmp_path):
    from moe_dist.config import load_config
    from moe_dist.train.entry import train_in_run_dir
    from moe_dist.train.runtime import build_runtime

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in llama.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.2)
    llama.save_pretrained(tmp_path / "llama")
    common = [*RUN, f"data.cache_dir={tmp_path / 'cache'}", f"model.init_from={tmp_path / 'llama'}"]

    dense_cfg = load_config(None, [*common, "moe.num_experts=0"])
    assert train_in_run_dir(dense_cfg, build_runtime(dense_cfg), tmp_path / "dense", overwrite=False) == 0
    moe = [*common, "moe.num_experts=4", "moe.expert_ffn_dim=64", "parallel.ep=2"]
    loss = run_distributed(train_ep, 2, str(tmp_path / "moe"), moe, timeout=180)[0]
    assert loss == pytest.approx(first_step_loss(tmp_path / "dense"), rel=1e-5)
