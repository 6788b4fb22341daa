"""Measured peak GPU memory of training steps against ``moe_dist.train.memory.estimate_memory``,
and the memory activation checkpointing saves. One JSON line per (config, checkpointing mode).

    python -m benchmarks.memory_estimate                  # on the GPU machine (benchmarks/run_gpu.sh memory)
    python -m benchmarks.memory_estimate --tiny           # CPU smoke run of the same code (no peak)

Each run builds the model from a real config, trains 3 steps with the native engine's optimizer,
bf16 autocast and the fused cross-entropy, and reads ``torch.cuda.max_memory_allocated`` (what
the estimate models; the allocator's reserve on top is reported apart).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from benchmarks.common import emit, gpu_name, log, pick_device
from moe_dist.config import load_config
from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
from moe_dist.models.cross_entropy import token_cross_entropy
from moe_dist.models.registry import build_model
from moe_dist.train.memory import GIB, estimate_memory
from moe_dist.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RUNS = [  # (name, config, overrides, checkpointing modes)
    ("moe_1b", "configs/scale/moe_1b.yaml", ["train.micro_batch_size=4"], ("none", "selective", "full")),
    ("fine_grained_e64", "configs/scale/moe_1b.yaml",
     ["train.micro_batch_size=4", "moe.num_experts=64", "moe.expert_ffn_dim=704", "moe.router.top_k=8",
      "moe.num_shared_experts=2"], ("none", "full")),
    ("dense_1b", "configs/scale/moe_1b.yaml", ["train.micro_batch_size=4", "moe.num_experts=0"], ("none",)),
]
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128", "model.vocab_size=256",
        "moe.expert_ffn_dim=64", "data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2"]


def measure(cfg, mode: str, device: torch.device, steps: int = 3) -> float | None:
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe).to(device)
    apply_activation_checkpointing(model, mode)
    optimizer = build_optimizer(model, cfg.train)
    batch, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(tokens[:, :-1])
        loss = token_cross_entropy(out.logits, tokens[:, 1:]) + sum(out.losses.values(), torch.zeros((), device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer, out, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    args = parser.parse_args()
    device = pick_device()
    for name, path, overrides, modes in RUNS:
        for mode in modes:
            cfg = load_config(str(ROOT / path), [*overrides, *(TINY if args.tiny else []), "train.dtype=bf16",
                                                  "train.engine=native", "zero.stage=0",
                                                  f"train.activation_checkpointing={mode}"])
            device_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
            estimate = estimate_memory(cfg, 1, device_memory, mode)
            log(f"{name} {mode}: estimate {estimate.total / GIB:.2f} GiB")
            try:
                peak = measure(cfg, mode, device)
            except torch.OutOfMemoryError:
                peak = float("nan")
            record = {"bench": "memory_estimate", "config": name, "checkpointing": mode, "device": gpu_name(device),
                      "params_b": round(estimate.total_params / 1e9, 3), "micro_batch": cfg.train.micro_batch_size,
                      "seq_len": cfg.data.seq_len, "estimate_gib": round(estimate.total / GIB, 2),
                      "estimate_activations_gib": round(estimate.activations / GIB, 2)}
            if peak is not None:
                record["measured_gib"] = round(peak / GIB, 2)
                record["estimate_over_measured"] = round(estimate.total / peak, 3)
            emit(record)


if __name__ == "__main__":
    main()
