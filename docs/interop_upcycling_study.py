"""The step-0 measurement of docs/interop.md: how far an upcycled model starts from the dense
model it comes from, on the dense run's validation sequences.

    moe-dist train --run-dir /tmp/dense moe.num_experts=0 train.steps=300   # the dense source (tiny.yaml)
    python docs/interop_upcycling_study.py /tmp/dense

For each layout the MoE model is initialised with ``model.init_from`` (moe.every=1, train.seed=0)
and evaluated without any training step. ``--count-once`` replaces partition mode's E/k rescaling
by one that counts each selected group once (the ablation in the doc).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_dist.config import load_config
from moe_dist.data import build_datasets
from moe_dist.models import upcycle
from moe_dist.models.registry import build_model
from moe_dist.train.checkpoint_reader import read_checkpoint
from moe_dist.train.init_from import initialize_from

LAYOUTS = {
    "copy E=8 k=2": ["moe.num_experts=8", "moe.expert_ffn_dim=384"],
    "partition E=8 k=2": ["moe.num_experts=8", "moe.expert_ffn_dim=48", "model.upcycle_mode=partition"],
    "partition E=4 k=2": ["moe.num_experts=4", "moe.expert_ffn_dim=96", "model.upcycle_mode=partition"],
    "partition E=8 k=4": ["moe.num_experts=8", "moe.router.top_k=4", "moe.expert_ffn_dim=48",
                          "model.upcycle_mode=partition"],
    "partition E=7 + 1 shared, k=2": ["moe.num_experts=7", "moe.num_shared_experts=1", "moe.expert_ffn_dim=48",
                                      "model.upcycle_mode=partition"],
    "partition E=8 k=8": ["moe.num_experts=8", "moe.router.top_k=8", "moe.expert_ffn_dim=48",
                          "model.upcycle_mode=partition"],
}


@torch.no_grad()
def val_loss(model: torch.nn.Module, batch: torch.Tensor, micro: int = 16) -> float:
    model.eval()
    losses = []
    for start in range(0, len(batch), micro):
        rows = batch[start:start + micro]
        logits = model(rows[:, :-1]).logits
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)))
    return torch.stack(losses).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense_run", type=Path)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--count-once", action="store_true")
    args = parser.parse_args()
    if args.count_once:
        upcycle.partition_scale = lambda moe: 1.0 / upcycle.typical_weight(moe)
    _, dense_cfg, state = read_checkpoint(args.dense_run)
    batch = build_datasets(dense_cfg.data).val.get(torch.arange(args.sequences))
    dense = build_model(dense_cfg.model, dense_cfg.moe)
    dense.load_state_dict(state)
    base = val_loss(dense, batch)
    print(f"| dense | {base:.4f} | |")
    model = dense_cfg.model
    shape = [f"model.dim={model.dim}", f"model.n_layers={model.n_layers}", f"model.n_heads={model.n_heads}",
             f"model.ffn_dim={model.ffn_dim}", f"model.max_seq_len={model.max_seq_len}",
             f"model.vocab_size={model.vocab_size}", f"model.init_from={args.dense_run}", "moe.every=1",
             "train.seed=0"]
    for name, overrides in LAYOUTS.items():
        cfg = load_config(None, [*shape, *overrides])
        torch.manual_seed(0)
        upcycled = build_model(cfg.model, cfg.moe)
        initialize_from(upcycled, cfg)
        loss = val_loss(upcycled, batch)
        print(f"| {name} | {loss:.4f} | {loss - base:+.4f} |")


if __name__ == "__main__":
    main()
