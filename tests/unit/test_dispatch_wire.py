"""What the all-to-all dispatcher puts on the wire, on a simulated 4-rank group in one process.

torch's fake process group runs every collective without moving data, so only shapes, dtypes
and the number of collectives are checked here (the values are covered by the gloo parity tests,
tests/distributed/test_ep_parity.py). The dropless count exchange is replaced by "each rank
receives the counts it sends" so that the split sizes are consistent.

Autocast: the dispatcher casts the rows with ``to_autocast_dtype`` (moe/experts.py), which acts
on CUDA tensors only; here a CPU stand-in that casts to bf16 takes its place, to check that the
cast happens before the all-to-all and that the gradients travel back in bf16 too. The real CUDA
autocast is checked in tests/gpu/test_host_syncs_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from moe_dist.config import CapacityConfig, MoEConfig, ParallelConfig, RouterConfig
from moe_dist.distributed import comms
from moe_dist.distributed.mesh import build_mesh
from moe_dist.models.expert_parallel import apply_ep
from moe_dist.moe.dispatch import all_to_all
from moe_dist.moe.layer import MoELayer

EP_SIZE = 4


@pytest.fixture
def fake_world(monkeypatch):
    """Rank 0 of a fake 4-rank world; yields the dtypes of the row buffers sent by all-to-alls."""
    wire: list[torch.dtype] = []
    a2a = comms._a2a

    def recording_a2a(out, inp, *args, **kwargs):
        wire.append(inp.dtype)
        return a2a(out, inp, *args, **kwargs)

    monkeypatch.setattr(comms, "_a2a", recording_a2a)
    monkeypatch.setattr(comms, "exchange_counts", lambda counts, group, record=None: counts.clone())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=EP_SIZE)
    try:
        yield wire
    finally:
        dist.destroy_process_group()


def _sharded_layer(policy: str) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, expert_ffn_dim=16, router=RouterConfig(top_k=2),
                    capacity=CapacityConfig(policy=policy))
    layer = MoELayer(16, 16, cfg)
    apply_ep(layer, build_mesh(ParallelConfig(ep=EP_SIZE), EP_SIZE, "cpu"))
    return layer


def _step(layer: MoELayer) -> torch.Tensor:
    x = torch.randn(2, 12, 16, requires_grad=True)
    out, losses = layer(x)
    (out.float().square().mean() + sum(losses.values())).backward()
    return out


@pytest.mark.parametrize("policy", ["dropless", "fixed"])
def test_rows_cross_the_wire_in_the_autocast_dtype(fake_world, monkeypatch, policy):
    layer = _sharded_layer(policy)
    _step(layer)
    assert fake_world == [torch.float32] * 4  # no autocast: fp32 rows and gradients

    fake_world.clear()
    monkeypatch.setattr(all_to_all, "to_autocast_dtype", lambda x: x.to(torch.bfloat16))
    out = _step(layer)
    # dispatch and combine forward, then both gradients backward: all bf16
    assert fake_world == [torch.bfloat16] * 4
    assert out.dtype == torch.bfloat16  # as LocalDispatcher returns under autocast
    assert layer.router.weight.grad.dtype == torch.float32


def test_capacity_agreement_runs_once_per_token_count(fake_world, monkeypatch):
    reductions = []
    all_reduce = comms.all_reduce
    monkeypatch.setattr(comms, "all_reduce",
                        lambda t, op, group, record=None: reductions.append(op) or all_reduce(t, op, group, record))
    layer = _sharded_layer("fixed")
    dispatcher = layer.dispatcher
    _step(layer)
    _step(layer)
    assert dispatcher.shape_checks == 1 and reductions == ["max"]
    out, _ = layer(torch.randn(1, 12, 16))  # a new token count: agreed once more
    assert out.shape == (1, 12, 16)
    assert dispatcher.shape_checks == 2 and reductions == ["max", "max"]
    assert dispatcher.host_syncs == 0  # the capacity path never reads splits back


def test_dropless_counts_one_split_read_per_dispatch(fake_world):
    layer = _sharded_layer("dropless")
    for _ in range(3):
        _step(layer)
    assert layer.dispatcher.host_syncs == 3 and layer.dispatcher.shape_checks == 0
