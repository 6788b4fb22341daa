"""``moe-dist export`` of a DeepSpeed checkpoint (2 gloo ranks, ZeRO-2, ep=2): the exported
weights are the trained module's, with each ep rank's experts taken from its ``experts_ep*.pt``
shard (DeepSpeed's own module file holds rank 0's experts only), and transformers' logits equal
moe_dist's (1e-5 absolute, fp32).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import run_distributed
from test_zero import skip_shm_build

transformers = pytest.importorskip("transformers")

TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
    "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32",
    "data.seq_len=32", "data.max_documents=2",
    "train.global_batch_size=4", "train.micro_batch_size=1", "train.warmup_steps=1", "train.steps=2",
    "train.eval_every=0", "train.engine=deepspeed", "train.device=cpu",
    "parallel.ep=2", "zero.stage=2", "checkpoint.every=2",
    "log.every=1", "log.progress_bar=false", "log.tensorboard=false",
]


def train_deepspeed(rank: int, world_size: int, run_dir: str, cache_dir: str) -> dict:
    from moe_dist.config import load_config
    from moe_dist.distributed.launch_env import LaunchEnv
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.engines.deepspeed import DeepSpeedTrainer
    from moe_dist.train.run_dir import prepare_run_dir
    from moe_dist.train.runtime import Runtime

    skip_shm_build()
    cfg = load_config(None, TINY + [f"data.cache_dir={cache_dir}"])
    env = LaunchEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, node_rank=0,
                    master_addr="127.0.0.1", master_port=29500, launcher="torchrun")
    runtime = Runtime(env, build_mesh(cfg, world_size, "cpu"), torch.device("cpu"))
    if rank == 0:
        prepare_run_dir(Path(run_dir), cfg, overwrite=False, is_writer=True)
    runtime.barrier()
    trainer = DeepSpeedTrainer(cfg, Path(run_dir), runtime)
    trainer.fit()
    # numpy: pickled by value (a tensor would travel as shared memory that dies with the rank)
    return {name: param.detach().numpy().copy() for name, param in trainer.module.named_parameters()}


def test_deepspeed_checkpoint_exports_with_every_ranks_experts(tmp_path):
    from moe_dist.interop.export import export_checkpoint
    from moe_dist.models.registry import build_model
    from moe_dist.train.checkpoint_reader import read_checkpoint

    ranks = [{name: torch.from_numpy(value) for name, value in weights.items()}
             for weights in run_distributed(train_deepspeed, 2, str(tmp_path / "run"), str(tmp_path / "cache"),
                                            timeout=240)]
    directory, cfg, state = read_checkpoint(tmp_path / "run")
    assert {p.name for p in directory.glob("experts_ep*.pt")} == {"experts_ep000.pt", "experts_ep001.pt"}
    for name, tensor in ranks[0].items():
        if ".experts." in name:  # [2 local experts] on each rank -> [4] in ep-rank order
            assert torch.equal(state[name], torch.cat([ranks[0][name], ranks[1][name]])), name
        else:
            assert torch.equal(state[name], tensor), name

    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens).logits, atol=1e-5, rtol=0)
