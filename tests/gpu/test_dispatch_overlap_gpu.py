"""Overlap in the MoE layer on one GPU (issue 19, "Overlap under expert parallelism").

* The shared experts on a side stream (``moe.overlap_shared_experts``, the default): output,
  input gradient and every parameter gradient equal the sequential path (``False``) up to the
  order in which autograd sums the input gradient's three contributions, in fp32 and bf16, dropless
  and fixed capacity; the side stream is really taken; the shared weights' gradients are
  accumulated (and their reduction hooks run) on the compute stream; and a training step on one
  GPU stays free of host syncs (``torch.cuda.set_sync_debug_mode("error")``).
* Chunked expert-parallel dispatch (``moe.dispatch_chunks=4``) through the all-to-all dispatcher
  of a simulated 4-rank group (torch's fake process group, as in test_host_syncs_gpu.py: no data
  moves, so only syncs are checked): one host sync per dropless step and none with fixed
  capacity, the same as unchunked.

Throughput of either overlap is not measured by the tests. Two timing entry points, both on the
fine-grained layer (h2048, f1408, E64, top-8, 2 shared experts, 8192 tokens per rank, bf16),
forward + backward, configurations alternating in blocks, medians:

* ``python tests/gpu/test_dispatch_overlap_gpu.py``: one GPU, ``overlap_shared_experts`` on and off;
* ``torchrun --nproc_per_node=P tests/gpu/test_dispatch_overlap_gpu.py --ep``: expert parallelism
  over the P GPUs (NCCL), ``dispatch_chunks`` 1, 2 and 4; the slowest rank's median is printed.
  ``--tiny`` runs it on CPU gloo at toy sizes (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if __name__ != "__main__" and not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

if __name__ != "__main__":  # the timing entry point below also runs on CPU (--tiny)
    from test_host_syncs_gpu import assert_syncs, fake_ep_world, training_step

from moe_dist.config import CapacityConfig, MoEConfig, ParallelConfig, RouterConfig  # noqa: E402
from moe_dist.moe import layer as layer_module  # noqa: E402
from moe_dist.moe.layer import MoELayer  # noqa: E402

DIM, FFN, EXPERTS, BATCH, SEQ = 256, 512, 8, 2, 512


def build_layer(policy: str, overlap: bool, dtype: torch.dtype, dispatch_chunks: int = 1) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=EXPERTS, expert_ffn_dim=FFN, num_shared_experts=2,
                    overlap_shared_experts=overlap, dispatch_chunks=dispatch_chunks,
                    router=RouterConfig(top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3),
                    capacity=CapacityConfig(policy=policy, capacity_factor=1.0))
    return MoELayer(DIM, FFN, cfg).to("cuda", dtype).train()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("policy", ["dropless", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_shared_experts_match_sequential(policy, dtype, monkeypatch):
    started = []
    real_start = layer_module.start_on_side_stream
    monkeypatch.setattr(layer_module, "start_on_side_stream",
                        lambda fn, x: started.append(x.shape) or real_start(fn, x))
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=dtype)
    results = []
    for overlap in (True, False):
        layer = build_layer(policy, overlap, dtype)
        x_in = x.clone().requires_grad_(True)
        out = training_step(layer, x_in)
        torch.cuda.synchronize()
        results.append([("out", out.detach()), ("x.grad", x_in.grad)]
                       + [(name, p.grad) for name, p in layer.named_parameters()])
    assert len(started) == 1, "the overlapped layer did not start its shared experts on the side stream"
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for (name, got), (_, want) in zip(*results):
        assert got is not None and want is not None, name
        assert rel_err(got, want) < bound, f"{name}: relative error {rel_err(got, want):.2e}"


def test_shared_expert_gradients_accumulate_on_the_current_stream():
    """Gradient-reduction hooks (``post_accumulate_grad``) of the shared experts' weights run
    with the compute stream current, never the side stream: a hook that reads a bucket of
    gradients on one stream then never reads one the side stream is still writing."""
    from moe_dist.moe.side_stream import side_stream

    layer = build_layer("dropless", True, torch.bfloat16)
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    main = torch.cuda.current_stream()
    seen = []
    for param in layer.shared_experts.parameters():
        param.register_post_accumulate_grad_hook(lambda p: seen.append(torch.cuda.current_stream()))
    training_step(layer, x)
    torch.cuda.synchronize()
    assert len(seen) == 3 and all(s == main for s in seen), (seen, main, side_stream(x.device))


def test_side_stream_training_step_is_sync_free():
    layer = build_layer("dropless", True, torch.bfloat16)
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm-ups: Triton compilation, cuBLAS handles, the allocator
        training_step(layer, x)
    assert_syncs(lambda: training_step(layer, x), 0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("policy,expected", [("dropless", 1), ("fixed", 0)])
def test_chunked_expert_parallel_step_syncs_as_unchunked(policy, expected):
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.models.expert_parallel import apply_ep

    with fake_ep_world(4):
        layer = build_layer(policy, True, torch.float32, dispatch_chunks=4)
        apply_ep(layer, build_mesh(ParallelConfig(ep=4), 4, "cuda"))
        x = torch.randn(BATCH, SEQ, DIM, device="cuda", requires_grad=True)
        assert layer.dispatches_in_chunks()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return training_step(layer, x)

        for _ in range(2):
            step()
        before = layer.dispatcher.host_syncs
        assert_syncs(step, expected)
        assert layer.dispatcher.host_syncs - before == expected


def time_side_stream(repeats: int = 5, iters: int = 20) -> None:
    """Median ms of forward + backward, side stream on and off, in alternating blocks."""
    hidden, ffn, experts, top_k, shared, tokens = 2048, 1408, 64, 8, 2, 8192
    x_in = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    layers = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=experts, expert_ffn_dim=ffn, num_shared_experts=shared,
                        overlap_shared_experts=overlap,
                        router=RouterConfig(top_k=top_k, aux_loss_coef=0.0, z_loss_coef=0.0))
        layers[overlap] = MoELayer(hidden, ffn, cfg).to("cuda", torch.bfloat16).train()

    def step(layer: MoELayer) -> None:
        out, _ = layer(x_in)
        out.view(tokens, hidden).backward(grad)

    times: dict[bool, list[float]] = {True: [], False: []}
    for layer in layers.values():
        for _ in range(5):
            step(layer)
    for _ in range(repeats):
        for overlap, layer in layers.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                step(layer)
            end.record()
            torch.cuda.synchronize()
            times[overlap].append(start.elapsed_time(end) / iters)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{torch.cuda.get_device_name()}: fine-grained layer fwd+bwd, side stream on "
          f"{median[True]:.3f} ms, off {median[False]:.3f} ms, ratio on/off {median[True] / median[False]:.3f} "
          f"(blocks: on {[round(t, 3) for t in times[True]]}, off {[round(t, 3) for t in times[False]]})")


def time_chunked_ep(tiny: bool, chunk_counts: tuple[int, ...] = (1, 2, 4), repeats: int = 5,
                    iters: int = 10) -> None:
    """Median ms of forward + backward under expert parallelism over the torchrun world, for each
    number of dispatch chunks (the slowest rank's median)."""
    import os
    import time

    import torch.distributed as dist

    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.models.expert_parallel import apply_ep

    cuda = not tiny
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    hidden, ffn, experts, top_k, shared, tokens = ((64, 32, 8, 4, 2, 64) if tiny
                                                   else (2048, 1408, 64, 8, 2, 8192))
    mesh = build_mesh(ParallelConfig(ep=world), world, device)
    layers = {}
    for chunks in chunk_counts:
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=experts, expert_ffn_dim=ffn, num_shared_experts=shared,
                        dispatch_chunks=chunks,
                        router=RouterConfig(top_k=top_k, aux_loss_coef=0.0, z_loss_coef=0.0))
        layers[chunks] = apply_ep(MoELayer(hidden, ffn, cfg).to(device, dtype).train(), mesh)
    torch.manual_seed(1 + rank)  # different tokens, so different routing, on every rank
    x_in = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def step(layer: MoELayer) -> None:
        out, _ = layer(x_in)
        out.view(tokens, hidden).backward(grad)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times: dict[int, list[float]] = {c: [] for c in chunk_counts}
    for layer in layers.values():
        for _ in range(3):
            step(layer)
    for _ in range(repeats):
        for chunks, layer in layers.items():
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                step(layer)
            sync()
            times[chunks].append((time.perf_counter() - start) * 1e3 / iters)
    medians = torch.tensor([sorted(times[c])[len(times[c]) // 2] for c in chunk_counts], device=device)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if rank == 0:
        where = torch.cuda.get_device_name() if cuda else "CPU gloo (--tiny: not a measurement)"
        print(f"{where} x{world}, ep={world}, fine-grained layer fwd+bwd, slowest rank's median ms: "
              + ", ".join(f"dispatch_chunks={c}: {m:.3f}" for c, m in zip(chunk_counts, medians.tolist())))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if "--ep" in sys.argv:
        time_chunked_ep(tiny="--tiny" in sys.argv)
    else:
        time_side_stream()
