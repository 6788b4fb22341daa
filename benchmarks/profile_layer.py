"""Where the time of one MoE layer forward + backward goes: torch.profiler's CUDA kernel table.

Prints, per shape, the kernels sorted by total device time (top ``--rows``), after warm-up.
Used to explain what limits the numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import log, pick_device
from benchmarks.moe_layer import SHAPES, TINY, build_moe_dist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args(argv)
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name in args.shapes:
        shape = TINY[name] if args.tiny else SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype, requires_grad=True)
        layer, forward = build_moe_dist(shape, x, device, dtype)
        grad = None
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            out = forward()
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(3):
                layer.zero_grad(set_to_none=True)  # as in training: no gradient accumulation
                out = forward()
                out.backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
        log(f"[profile] {shape.name}")
        print(f"== {shape.name} (3 iterations of forward + backward) ==")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=70))
        del layer, forward, x


if __name__ == "__main__":
    main()
