"""Upcycling and export through the real trainer (in this process, one rank, the bundled corpus):

* a run initialised from a dense Hugging Face Llama (``model.init_from``, copy mode) logs the same
  first-step loss as the dense run initialised from it, on the same batch;
* the MoE run's checkpoint, written by the trainer, exports to a MixtralForCausalLM whose logits
  equal moe_dist's (1e-5 absolute, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.interop.export import export_checkpoint
from moe_dist.models.registry import build_model
from moe_dist.train.checkpoint_reader import read_checkpoint
from moe_dist.train.entry import train_in_run_dir
from moe_dist.train.runtime import build_runtime

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

RUN = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
       "model.norm_eps=1e-5", "moe.every=1", "data.seq_len=32", "data.max_documents=2",
       "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=1", "train.eval_every=0",
       "checkpoint.every=1", "log.every=1", "log.progress_bar=false", "log.tensorboard=false",
       "train.device=cpu"]


def train(run_dir: Path, cache: Path, *overrides: str) -> dict:
    cfg = load_config(None, [*RUN, f"data.cache_dir={cache}", *overrides])
    assert train_in_run_dir(cfg, build_runtime(cfg), run_dir, overwrite=False) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in records if r.get("step") == 1)


def test_upcycled_first_step_loss_equals_the_dense_one_and_the_checkpoint_exports(tmp_path):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in llama.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.2)
    llama.save_pretrained(tmp_path / "llama")
    init = f"model.init_from={tmp_path / 'llama'}"

    dense = train(tmp_path / "dense", tmp_path / "cache", init, "moe.num_experts=0")
    moe = train(tmp_path / "moe", tmp_path / "cache", init, "moe.num_experts=4", "moe.expert_ffn_dim=64",
                "model.upcycle_noise_std=0")
    key = "lm_loss" if "lm_loss" in dense else "train/lm_loss"
    assert moe[key] == pytest.approx(dense[key], rel=1e-5)

    export_checkpoint(tmp_path / "moe", tmp_path / "hf")
    _, cfg, state = read_checkpoint(tmp_path / "moe")
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens).logits, atol=1e-5, rtol=0)
