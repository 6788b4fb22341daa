"""Host syncs of one MoE training step, counted by CUDA itself rather than by our own counters.

Every router type x capacity policy runs one forward + backward of an MoE layer (router losses
included) after two warm-ups, under ``torch.cuda.set_sync_debug_mode``:

* on one GPU (``LocalDispatcher``), and
* through the ``AllToAllDispatcher`` of a simulated 4-rank expert-parallel group (torch's fake
  process group in this one process; its collectives move no data, so the dropless count
  exchange is replaced by "every rank receives what it sends" to keep the splits consistent),
  under bf16 autocast with fp32 parameters and an fp32 residual stream.

Where the count should be 0 the step runs under mode "error" (any sync raises); the documented
exceptions are counted under mode "warn" and must match exactly (docs/parallelism.md, "Host
syncs"):

| policy | one GPU | expert parallel (all-to-all) |
|---|---|---|
| dropless | 0 | 1: the split sizes of the uneven all-to-all |
| fixed | 0 | 0 |
| dynamic | 1: the capacity read to the host | 2: the capacity, then the split sizes |
| controller | 0 | 1: the split sizes (it dispatches dropless) |

A CUDA graph that captures a fixed-capacity layer's forward + backward and replays it with the
eager results is the end-to-end proof that the capacity path never syncs.

``python tests/gpu/test_host_syncs_gpu.py`` prints the counts of the whole matrix with the
source line of each sync (the measurement quoted in docs/performance.md).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if __name__ != "__main__" and not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from benchmarks.common import host_sync_sites  # noqa: E402
from moe_dist.config import CapacityConfig, MoEConfig, ParallelConfig, RouterConfig  # noqa: E402
from moe_dist.moe.layer import MoELayer  # noqa: E402

ROUTERS = ["softmax_topk", "sigmoid_topk", "top_p", "xmoe", "da_moe", "top_any", "expert_choice"]
POLICIES = ["dropless", "fixed", "dynamic", "controller"]
LOCAL_SYNCS = {"dropless": 0, "fixed": 0, "dynamic": 1, "controller": 0}
EP_SYNCS = {"dropless": 1, "fixed": 0, "dynamic": 2, "controller": 1}
EP_SIZE = 4
DIM, FFN, EXPERTS, BATCH, SEQ = 256, 512, 8, 2, 512


def build_layer(router: str, policy: str, dtype: torch.dtype = torch.bfloat16,
                capacity_factor: float = 1.25) -> MoELayer:
    """dim 256, 8 experts of width 512, top-2 (the cap for variable-k routers), aux 0.01, z 0.001."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=EXPERTS, expert_ffn_dim=FFN,
                    router=RouterConfig(type=router, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3),
                    capacity=CapacityConfig(policy=policy, capacity_factor=capacity_factor))
    return MoELayer(DIM, FFN, cfg).to("cuda", dtype).train()


def training_step(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    out, losses = layer(x)
    loss = out.float().square().mean() + sum(losses.values())
    loss.backward()
    return out


def count_syncs(step) -> list[str]:
    """Run ``step()`` under sync debug mode "warn"; one 'file:line' per device-to-host sync."""
    return host_sync_sites(step, torch.device("cuda"))


def assert_syncs(step, expected: int) -> None:
    """Sync-free steps run under mode "error"; the others must sync exactly ``expected`` times."""
    if expected == 0:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return
    where = count_syncs(step)
    assert len(where) == expected, f"{len(where)} host syncs, documented {expected}: {where}"


def local_step(router: str, policy: str):
    layer = build_layer(router, policy)
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm-ups: Triton compilation, cuBLAS handles, the allocator
        training_step(layer, x)
    return lambda: training_step(layer, x), layer, x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_one_gpu_step_syncs_as_documented(router, policy):
    step, layer, x = local_step(router, policy)
    assert_syncs(step, LOCAL_SYNCS[policy])
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.router.weight.grad).all()


# --------------------------------------------------------------------------------------------
# Expert parallelism on a simulated 4-rank group
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_ep_world(world_size: int = EP_SIZE):
    """Rank 0 of a fake ``world_size``-rank group (no data moves), with count exchanges made
    consistent (each rank receives the counts it sends) and the dtypes of every row buffer
    that crosses the wire recorded."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moe_dist.distributed import comms

    wire: list[torch.dtype] = []
    a2a, exchange = comms._a2a, comms.exchange_counts

    def recording_a2a(out, inp, *args, **kwargs):
        wire.append(inp.dtype)
        return a2a(out, inp, *args, **kwargs)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    comms._a2a = recording_a2a
    comms.exchange_counts = lambda counts, group, record=None: counts.clone()
    try:
        yield wire
    finally:
        comms._a2a, comms.exchange_counts = a2a, exchange
        dist.destroy_process_group()


def ep_step(router: str, policy: str):
    """A layer sharded by ``apply_ep`` over the current (fake) world, fp32 parameters, fp32
    input, bf16 autocast; returns (step, layer, x) after two warm-ups."""
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.models.expert_parallel import apply_ep

    layer = build_layer(router, policy, dtype=torch.float32)
    apply_ep(layer, build_mesh(ParallelConfig(ep=EP_SIZE), EP_SIZE, "cuda"))
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return training_step(layer, x)

    for _ in range(2):
        step()
    return step, layer, x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_expert_parallel_step_syncs_as_documented(router, policy):
    with fake_ep_world() as wire:
        step, layer, _ = ep_step(router, policy)
        wire.clear()
        syncs_before = layer.dispatcher.host_syncs
        assert_syncs(step, EP_SYNCS[policy])
        # the dispatcher's own counter agrees with CUDA: the split read is its only sync
        assert layer.dispatcher.host_syncs - syncs_before == (0 if policy == "fixed" else 1)
        # rows (forward) and their gradients (backward) cross the wire in bf16, not fp32
        assert wire == [torch.bfloat16] * 4, wire


def test_capacity_shape_agreement_does_not_sync():
    """A new token count in fixed-capacity mode agrees on the capacity over the ep group with a
    device-side assert, not a host read."""
    import torch.distributed as dist

    from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher

    with fake_ep_world():
        dispatcher = AllToAllDispatcher(EXPERTS, dist.group.WORLD, 0, EP_SIZE,
                                        capacity_fn=lambda tokens, top_k: tokens * top_k // EXPERTS)

        def round_trip(num_tokens: int) -> None:
            x = torch.randn(num_tokens, DIM, device="cuda", dtype=torch.bfloat16)
            indices = torch.randint(0, EXPERTS, (num_tokens, 2), device="cuda")
            rows, counts, handle = dispatcher.dispatch(x, indices, None)
            dispatcher.combine(rows, torch.rand(num_tokens, 2, device="cuda"), handle)

        round_trip(1024)  # warm-up (kernels compiled for these size classes)
        assert_syncs(lambda: round_trip(512), 0)
        assert dispatcher.shape_checks == 2


# --------------------------------------------------------------------------------------------
# CUDA graph of the capacity path
# --------------------------------------------------------------------------------------------

def test_fixed_capacity_layer_replays_as_a_cuda_graph():
    """Capture forward + backward of a fixed-capacity layer (router losses included) in one CUDA
    graph (capture fails on any host sync) and replay it on a new input: output, input gradient
    and parameter gradients equal the eager step's."""
    layer = build_layer("softmax_topk", "fixed", capacity_factor=0.75)  # some assignments drop
    static_x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            training_step(layer, static_x)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # detached: nothing keeps the captured autograd graph alive for the eager steps below
        static_out = training_step(layer, static_x).detach()

    params = [p for p in layer.parameters() if p.requires_grad]
    for seed in (1, 2):
        new_x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16,
                            generator=torch.Generator("cuda").manual_seed(seed))
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [static_out.clone(), static_x.grad.clone()] + [p.grad.clone() for p in params]

        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        eager_x = new_x.clone().requires_grad_(True)
        eager_out = training_step(layer, eager_x)
        eager = [eager_out.detach(), eager_x.grad] + [p.grad for p in params]
        for p, g in zip(params, saved):  # the graph keeps writing into its own buffers
            p.grad = g
        for got, want in zip(replayed, eager):
            torch.testing.assert_close(got, want)
    # drops really happened (the capacity path, not a dropless run with a large factor)
    assert layer.stats.kept.sum() < layer.stats.routed.sum()


# --------------------------------------------------------------------------------------------
# The measurement: python tests/gpu/test_host_syncs_gpu.py
# --------------------------------------------------------------------------------------------

def _backward_sync_ops(step) -> list[str]:
    """The autograd/aten ops around each synchronising CUDA runtime call of one step
    (torch.profiler), to locate syncs that the warning only places at ``backward()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    found = []
    for event in prof.events():
        if "Synchronize" in event.name or event.name in ("cudaMemcpy", "cudaMemcpyDtoH"):
            chain, parent = [], event.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.cpu_parent
            found.append(f"{event.name} <- {' <- '.join(chain)}")
    return found


def main() -> None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| router | policy | one GPU | expert parallel (fake 4 ranks, autocast) | wire dtypes |")
    print("|---|---|---|---|---|")
    details = []
    for router in ROUTERS:
        for policy in POLICIES:
            step, _, _ = local_step(router, policy)
            local = count_syncs(step)
            local_ops = _backward_sync_ops(step) if local else []
            with fake_ep_world() as wire:
                ep, _, _ = ep_step(router, policy)
                wire.clear()
                remote = count_syncs(ep)
                dtypes = sorted({str(d).replace("torch.", "") for d in wire})
                remote_ops = _backward_sync_ops(ep) if remote else []
            print(f"| {router} | {policy} | {len(local)} | {len(remote)} | {','.join(dtypes)} |")
            details.append((router, policy, local, local_ops, remote, remote_ops))
    for router, policy, local, local_ops, remote, remote_ops in details:
        for label, where, ops in (("one GPU", local, local_ops), ("ep", remote, remote_ops)):
            if where:
                print(f"{router}/{policy} {label}: {where}")
                for op in ops:
                    print(f"    {op}")


if __name__ == "__main__":
    main()
