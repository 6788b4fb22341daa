"""HMoE expert compute: grouped GEMM by width vs padding to the largest width vs one matmul per
expert (model.hmoe.gemm), forward + backward of one HMoE layer; the homogeneous top-2 MoE layer of
the same mean width is timed beside them. CPU timings are relative comparisons only.

    python docs/hmoe_gemm_bench.py [--tokens 4096] [--dim 128] [--repeats 7]
    python docs/hmoe_gemm_bench.py --device cuda --tokens 16384 --dim 1024 --scale 8   # bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_dist.config import MoEConfig, RouterConfig
from moe_dist.config.model import HMoEConfig
from moe_dist.models.hmoe import HMoELayer
from moe_dist.moe.layer import MoELayer

WIDTH_SETS = {
    "2 widths x 4": [64] * 4 + [320] * 4,
    "4 widths x 2 (configs/hmoe.yaml)": [64, 64, 128, 128, 256, 256, 320, 320],
    "8 widths": [32, 64, 96, 160, 224, 256, 288, 416],
}


def _time(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out, _ = layer(x)
        out.float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first pass warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scale", type=int, default=1, help="multiply every width (and the mean 192) by this")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = torch.randn(1, args.tokens, args.dim, device=args.device, dtype=dtype)
    s = args.scale
    moe = MoEConfig(num_experts=8, expert_ffn_dim=192 * s, router=RouterConfig(top_k=2, aux_loss_coef=0.0,
                                                                           z_loss_coef=0.0))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, {dtype}, T={args.tokens}, D={args.dim}, widths x{s}, "
          f"E=8, top-2; ms per forward+backward (median of {args.repeats})")
    homogeneous = MoELayer(args.dim, 4 * args.dim, moe).to(args.device, dtype)
    print(f"| homogeneous MoELayer, width {192 * s} | {_time(homogeneous, x, args.repeats):.1f} |")
    for name, widths in WIDTH_SETS.items():
        row = []
        for gemm in ("by_width", "padded", "per_expert"):
            layer = HMoELayer(args.dim, moe, HMoEConfig(widths=[w * s for w in widths], gemm=gemm), 192 * s)
            layer.reset_arch_parameters(0.02, 0.02)
            layer.to(args.device, dtype)
            row.append(f"{gemm} {_time(layer, x, args.repeats):.1f}")
        print(f"| {name} (mean {s * sum(widths) / 8:.0f}) | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
