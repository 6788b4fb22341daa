"""Expert-parallel dispatch + combine bandwidth against a bare all-to-all of the same bytes.

Launch one process per device (``torchrun --nproc_per_node=N -m benchmarks.dispatch_bw``);
NCCL on GPUs, gloo on CPU (``--tiny``). Every rank holds ``tokens`` tokens, routes them
uniformly at random to top-k of ``experts_per_rank * N`` experts, and times

* ``moe_dist``: ``AllToAllDispatcher.dispatch`` then ``combine`` (dropless: count exchange, one
  host sync, uneven all-to-all, local re-sort; the experts are the identity), forward only;
* ``bare``: two ``all_to_all_single`` calls of ``T*K`` rows with even splits (what dispatch and
  combine must move at least).

Bus bandwidth (nccl-tests convention for all-to-all): ``bytes per rank * (N-1)/N / time``,
with ``bytes = 2 * T*K * hidden * element size`` (there and back). Rank 0 prints the JSON lines.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchmarks.common import emit, gpu_name, time_call
from moe_dist.distributed import comms
from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (CPU gloo)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.iters = 64, 32, 3

    use_cuda = torch.cuda.is_available() and not args.tiny
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        return _bench(args, device)
    finally:
        if created:
            dist.destroy_process_group()


def _bench(args, device: torch.device) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_experts = args.experts_per_rank * world
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device=device, dtype=dtype)
    indices = torch.rand(args.tokens, num_experts, generator=gen).topk(args.top_k, dim=-1).indices.to(device)
    weights = torch.full((args.tokens, args.top_k), 1.0 / args.top_k, device=device)
    dispatcher = AllToAllDispatcher(num_experts, group, rank, world)

    def moe_dist_round_trip():
        with torch.no_grad():
            expert_in, _, handle = dispatcher.dispatch(x, indices, None)
            return dispatcher.combine(expert_in, weights, handle)

    rows = args.tokens * args.top_k
    send = torch.randn(rows, args.hidden, generator=gen).to(device=device, dtype=dtype)
    recv = torch.empty_like(send)
    even = [rows // world] * world
    even[-1] += rows - sum(even)

    def bare_round_trip():
        comms.all_to_all_single(recv, send, even, even, group)
        comms.all_to_all_single(send, recv, even, even, group)

    # Correctness first: identity experts with weights summing to 1 give x back.
    out = moe_dist_round_trip()
    torch.testing.assert_close(out.float(), x.float(), rtol=1e-2, atol=1e-2)

    results = []
    bytes_per_rank = 2 * rows * args.hidden * x.element_size()
    for system, fn in (("moe_dist", moe_dist_round_trip), ("bare_all_to_all", bare_round_trip)):
        ms = time_call(fn, device, warmup=2, iters=args.iters)
        # The slowest rank sets the pace.
        t = torch.tensor([ms], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = t.item()
        busbw = bytes_per_rank * (world - 1) / world / (ms * 1e-3) / 1e9 if world > 1 else None
        results.append({"bench": "dispatch_bw", "system": system, "world": world, "tokens": args.tokens,
                        "hidden": args.hidden, "top_k": args.top_k, "experts": num_experts,
                        "dtype": str(dtype).removeprefix("torch."), "device": gpu_name(device),
                        "ms": round(ms, 3), "busbw_gbs": round(busbw, 3) if busbw is not None else None, "status": "ok"})
    if world > 1:
        results[0]["fraction_of_bare"] = round(results[1]["ms"] / results[0]["ms"], 3)
    if rank == 0:
        for record in results:
            emit(record)
    return results


if __name__ == "__main__":
    main()
