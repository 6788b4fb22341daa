"""The largest MoE that trains on one GPU (issue 15 section 6): a few optimizer steps of the native
engine's real training step (``NativeTrainer.train_step``: accumulation, clipping, the AdamW step,
the schedule), with or without the optimizer offload (``train.offload_optimizer``) and with any
activation checkpointing mode.

The default shape is ``configs/scale/moe_8b_one_gpu.yaml`` (8.43B parameters, 1.79B active:
d2048, 16 layers, top-4 of 28 experts of width 2816 plus 1 shared, vocab 32768, sequence 2048).
Data: the bundled corpus (byte tokenizer), as the trainer loads it. Nothing is checkpointed.

One JSON line per result: total and active parameters, the median step time over the timed steps
and the time of its optimizer part (clip excluded: ``optimizer.step``), tokens/s, TFLOP/s and
MFU against 989 TFLOP/s (the H100 SXM bf16 datasheet; model FLOPs of
``moe_dist.metrics.flops``, recompute not counted), peak GPU memory (allocator), the host's
resident memory now and at its peak, the memory estimate of ``moe-dist train --dry-run`` for the
same config, and the first and last step's loss.

    python -m benchmarks.largest_model                       # the 8.43B default, offload on
    python -m benchmarks.largest_model --micro-batch 4 --accum 128 --checkpointing selective
    python -m benchmarks.largest_model --tiny                # CPU, seconds
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import emit, gpu_name, log, pick_device
from moe_dist.config import load_config
from moe_dist.distributed.launch_env import LaunchEnv
from moe_dist.metrics import DeviceMeans
from moe_dist.metrics.flops import training_flops_per_token
from moe_dist.train.memory import GIB, estimate_memory

PEAK_TFLOPS = 989.0
"""H100 SXM dense bf16 datasheet peak, the MFU denominator of docs/performance.md."""

DEFAULT = dict(dim=2048, layers=16, heads=16, experts=28, expert_ffn=2816, top_k=4, shared=1, vocab=32768,
               seq=2048, micro_batch=2, accum=256)
TINY = dict(dim=32, layers=2, heads=2, experts=4, expert_ffn=32, top_k=2, shared=1, vocab=256, seq=32,
            micro_batch=2, accum=3)


def overrides(args) -> list[str]:
    """The config of the run, as ``moe-dist train`` overrides."""
    return [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
            f"model.ffn_dim={args.expert_ffn}", f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq}",
            f"moe.num_experts={args.experts}", "moe.every=1", f"moe.expert_ffn_dim={args.expert_ffn}",
            f"moe.router.top_k={args.top_k}", f"moe.num_shared_experts={args.shared}",
            "moe.capacity.policy=dropless", "data.tokenizer=byte", f"data.seq_len={args.seq}",
            *(["data.max_documents=4"] if args.tiny else []),
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch * args.accum}",
            f"train.steps={args.warmup + args.steps}", "train.warmup_steps=1", "train.lr=3e-4",
            f"train.activation_checkpointing={args.checkpointing}",
            f"train.offload_optimizer={str(args.offload).lower()}", *args.set,
            f"train.device={'cpu' if args.tiny else 'auto'}", "train.dtype=auto", "train.eval_every=0",
            "log.progress_bar=false", "log.tensorboard=false"]


def host_rss_gib() -> tuple[float, float]:
    """(resident now, peak resident) of this process, GiB (Linux /proc and getrusage)."""
    now = 0.0
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024 / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return now, peak


def run(args) -> dict:
    from moe_dist.train.engines.native import NativeTrainer
    from moe_dist.train.runtime import build_runtime

    device = torch.device("cpu") if args.tiny else pick_device()
    cfg = load_config(None, overrides(args))
    estimate = estimate_memory(cfg, 1, None, cfg.train.activation_checkpointing)
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                    master_addr="127.0.0.1", master_port=0, launcher="single")
    setup_start = time.perf_counter()
    trainer = NativeTrainer(cfg, Path(tempfile.mkdtemp(prefix="largest_model_")), build_runtime(cfg, env))
    setup_s = time.perf_counter() - setup_start
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    optimizer_s: list[float] = []
    inner_step = trainer.optimizer.step

    def timed_step(*a, **k):
        sync()
        start = time.perf_counter()
        out = inner_step(*a, **k)
        sync()
        optimizer_s.append(time.perf_counter() - start)
        return out

    trainer.optimizer.step = timed_step
    step_s, losses = [], []
    means = DeviceMeans()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Seems like `optimizer.step")  # timed_step
        for index in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            trainer.train_step(means)
            sync()
            elapsed = time.perf_counter() - start
            losses.append(means.pop()["train/loss"])
            log(f"step {index + 1}: {elapsed:.2f} s (optimizer {optimizer_s[-1]:.2f} s), loss {losses[-1]:.4f}")
            if index >= args.warmup:
                step_s.append(elapsed)
    timed_optimizer = optimizer_s[args.warmup:]
    step = statistics.median(step_s)
    tokens = args.micro_batch * args.accum * args.seq
    flops = training_flops_per_token(cfg.model, cfg.moe, args.seq, model=trainer.model).total
    tokens_per_s = tokens / step
    rss, rss_peak = host_rss_gib()
    return {
        "bench": "largest_model", "device": gpu_name(device), "status": "ok",
        "offload": args.offload, "checkpointing": args.checkpointing,
        "dim": args.dim, "layers": args.layers, "experts": args.experts, "expert_ffn": args.expert_ffn,
        "top_k": args.top_k, "shared": args.shared, "vocab": args.vocab, "seq": args.seq,
        "micro_batch": args.micro_batch, "accum": args.accum, "tokens_per_step": tokens,
        "total_params": estimate.total_params, "active_params": estimate.active_params,
        "flops_per_token": flops, "setup_s": round(setup_s, 2),
        "step_s": round(step, 6), "optimizer_s": round(statistics.median(timed_optimizer), 6),
        "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / (PEAK_TFLOPS * 1e12),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2) if cuda else None,
        "host_rss_gib": round(rss, 2), "host_peak_rss_gib": round(rss_peak, 2),
        "estimate_gpu_gib": round(estimate.total / GIB, 6),
        "estimate_host_gib": round(estimate.optimizer_on_host / GIB, 6),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "steps_timed": len(step_s),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (seconds)")
    for name, value in DEFAULT.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                        help="train.offload_optimizer (default on)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override, e.g. --set data.source=/path/to/corpus")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else DEFAULT).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        result = run(args)
    except torch.cuda.OutOfMemoryError as exc:
        result = {"bench": "largest_model", "status": f"oom: {str(exc).splitlines()[0][:200]}",
                  "offload": args.offload, "checkpointing": args.checkpointing, "micro_batch": args.micro_batch}
    emit(result)
    return [result]


if __name__ == "__main__":
    main()
