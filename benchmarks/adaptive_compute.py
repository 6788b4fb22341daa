"""Does adaptive routing pay off? Experts activated per token vs dispatched rows, expert FLOPs
and time, for every router at several thresholds (one process, CPU or one GPU).

For each setting it builds one MoE layer, routes a fixed batch, and measures:

- ``mean_k``: valid assignments per token (what the router chose);
- ``dispatched_rows``: rows the dispatcher hands to the experts (``tokens_per_expert.sum()``;
  under expert parallelism the all-to-all sends exactly these rows);
- ``buffer_rows``: rows of the permuted buffer, ``T * Kmax`` (invalid slots are padding that
  is gathered but never computed);
- ``expert_gflops``: matmul FLOPs the experts really executed, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the per-expert loop (not a formula);
- ``expert_ms`` / ``layer_ms``: median forward time of the experts alone on the permuted
  buffer (what the one-process LocalDispatcher hands them, padding rows included) / the layer;
- ``expert_ms_compact``: the experts on the valid rows only (what an expert-parallel rank
  receives from the dropless all-to-all, which sends only valid rows).

Usage: ``python benchmarks/adaptive_compute.py [--tokens 2048] [--experts 16]`` -> JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_dist.config import MoEConfig, RouterConfig
from moe_dist.moe.layer import MoELayer


def settings(num_experts: int) -> list[tuple[str, dict, dict]]:
    """(label, router config, tweaks) for each measured point."""
    cap = dict(top_k=num_experts)
    out = [(f"softmax_topk k={k}", dict(type="softmax_topk", top_k=k), {}) for k in (1, 2, 4)]
    out += [(f"top_p p={p}", dict(type="top_p", top_p=p, **cap), {}) for p in (0.2, 0.4, 0.6, 0.8)]
    out += [(f"xmoe t={t}", dict(type="xmoe", xmoe_threshold=t, **cap), {}) for t in (0.5, 0.7, 0.9)]
    out += [(f"da_moe Kmax={k}", dict(type="da_moe", top_k=k), {}) for k in (2, 4)]
    out += [(f"expert_choice c={c}", dict(type="expert_choice", expert_choice_capacity=c), {}) for c in (1.0, 2.0)]
    out += [(f"top_any G={g}", dict(type="top_any", **cap), {"threshold": g}) for g in (0.0, 0.05, 0.1, 0.15)]
    return out


def median_ms(fn, iters: int, device: torch.device) -> float:
    times = []
    for i in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first call is warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(label: str, router_kw: dict, tweaks: dict, x_BSD: torch.Tensor, num_experts: int,
            ffn_dim: int, router_std: float, iters: int) -> dict:
    torch.manual_seed(0)
    dim = x_BSD.shape[-1]
    cfg = MoEConfig(num_experts=num_experts, grouped_gemm="loop",
                    router=RouterConfig(aux_loss_coef=0.0, z_loss_coef=0.0, **router_kw))
    layer = MoELayer(dim, ffn_dim, cfg).to(x_BSD.device).eval()
    if router_kw["type"] != "top_any":
        layer.router.weight.normal_(std=router_std)  # a peakier router than the 0.02 init
    if "threshold" in tweaks:
        layer.router.threshold.fill_(tweaks["threshold"])
    x_TD = x_BSD.reshape(-1, dim)
    routing = layer.route(x_TD, x_BSD.shape[1])
    expert_in, tokens_per_expert, _ = layer.dispatcher.dispatch(x_TD, routing.indices, routing.valid)
    counter = FlopCounterMode(display=False)
    with counter:
        layer.experts(expert_in, tokens_per_expert)
    num_tokens = x_TD.shape[0]
    compact_in = expert_in[:int(tokens_per_expert.sum())]  # NOTE: device-to-host sync (benchmark only)
    valid = routing.valid.sum().item() if routing.valid is not None else routing.indices.numel()
    return {
        "bench": "adaptive_compute", "setting": label, "router": router_kw["type"],
        "tokens": num_tokens, "experts": num_experts, "dim": dim, "ffn_dim": ffn_dim,
        "mean_k": valid / num_tokens,
        "dispatched_rows": int(tokens_per_expert.sum()),
        "buffer_rows": int(expert_in.shape[0]),
        "expert_gflops": counter.get_total_flops() / 1e9,
        "expert_gflops_per_token": counter.get_total_flops() / 1e9 / num_tokens,
        "expert_ms": median_ms(lambda: layer.experts(expert_in, tokens_per_expert), iters, x_BSD.device),
        "expert_ms_compact": median_ms(lambda: layer.experts(compact_in, tokens_per_expert), iters, x_BSD.device),
        "layer_ms": median_ms(lambda: layer(x_BSD), iters, x_BSD.device),
        "device": x_BSD.device.type,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--router-std", type=float, default=0.1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1)
    x = torch.randn(args.tokens // args.seq_len, args.seq_len, args.dim, device=device)
    for label, router_kw, tweaks in settings(args.experts):
        record = measure(label, router_kw, tweaks, x, args.experts, args.ffn_dim, args.router_std, args.iters)
        print(json.dumps(record, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
