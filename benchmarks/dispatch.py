"""Router + permute + un-permute alone, as a share of the whole MoE layer, and host syncs.

For each shape (see ``benchmarks.moe_layer``) and each moe_dist path (``moe_dist``: Triton fast
paths; ``moe_dist_torch``: plain torch), times forward + backward of

* ``routing``: router -> dispatch (permute) -> combine (weighted un-permute), the experts
  replaced by the identity, and
* ``layer``: the whole MoELayer,

and reports ``share = routing / layer`` (event times: a routing pass run alone is bound by
kernel launches on the host, which a real layer hides behind its GEMMs) and ``share_kernel``
(summed device kernel time of each, from torch.profiler). On CUDA it also counts the device-to-host
synchronisations of one dropless forward + backward of the layer (``torch.cuda`` sync debug
mode, warnings counted; 0 is the target).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import (count_host_syncs, emit, error_record, gpu_name, log, pick_device,
                               reference_kernels_only, resolve_repeats, time_fwd_bwd)
from benchmarks.moe_layer import SHAPES, TINY, Shape, build_moe_dist


def forward_backward(forward) -> None:
    """One forward + backward of ``forward()``'s output."""
    out = forward()
    out.backward(torch.ones_like(out))


def device_kernel_ms(forward, device: torch.device, iters: int = 3) -> float | None:
    """Summed device time of the kernels of one forward + backward (launch gaps excluded):
    what routing costs inside a layer whose GEMMs hide its launch overhead."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            out = forward()
            grad = torch.ones_like(out) if grad is None else grad
            out.backward(grad)
        torch.cuda.synchronize(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e3 / iters


def run(shape: Shape, system: str, args, device, dtype) -> dict:
    base = {"bench": "dispatch", "shape": shape.name, "system": system, "tokens": shape.tokens,
            "hidden": shape.hidden, "experts": shape.num_experts, "top_k": shape.top_k,
            "device": gpu_name(device)}
    torch.manual_seed(0)
    x = (torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype) * 0.5).requires_grad_(True)
    ctx = reference_kernels_only() if system == "moe_dist_torch" else contextlib.nullcontext()
    try:
        with ctx:
            layer, layer_forward = build_moe_dist(shape, x, device, dtype)

            def routing_forward():
                routing = layer.router(x, seq_len=shape.tokens)
                x_sorted, _, handle = layer.dispatcher.dispatch(x, routing.indices, routing.valid)
                return layer.dispatcher.combine(x_sorted, routing.weights, handle)

            def zero_grad():
                layer.zero_grad(set_to_none=True)
                x.grad = None

            routing_t = time_fwd_bwd(routing_forward, device, args.warmup, args.iters, zero_grad)
            layer_t = time_fwd_bwd(layer_forward, device, args.warmup, args.iters, zero_grad)
            syncs = count_host_syncs(lambda: forward_backward(layer_forward), device, "dispatch")
            routing_kernel = device_kernel_ms(routing_forward, device)
            layer_kernel = device_kernel_ms(layer_forward, device)
    except Exception as exc:
        log(f"[dispatch] {system} on {shape.name} failed: {exc!r}")
        return error_record(base, exc)
    return {**base, "status": "ok",
            "routing_fwd_ms": round(routing_t.fwd_ms, 3), "routing_bwd_ms": round(routing_t.bwd_ms, 3),
            "layer_fwd_ms": round(layer_t.fwd_ms, 3), "layer_bwd_ms": round(layer_t.bwd_ms, 3),
            "share": round(routing_t.total_ms / layer_t.total_ms, 4), "host_syncs": syncs,
            "routing_kernel_ms": round(routing_kernel, 3) if routing_kernel is not None else None,
            "share_kernel": round(routing_kernel / layer_kernel, 4) if routing_kernel and layer_kernel else None,
            "peak_mem_gib": round(layer_t.peak_mem_gib, 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--systems", nargs="+", default=["moe_dist", "moe_dist_torch"],
                        choices=["moe_dist", "moe_dist_torch"])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = pick_device()
    resolve_repeats(args, warmup=5, iters=20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for name in args.shapes:
        for system in args.systems:
            record = run(TINY[name] if args.tiny else SHAPES[name], system, args, device, dtype)
            emit(record)
            results.append(record)
    return results


if __name__ == "__main__":
    main()
