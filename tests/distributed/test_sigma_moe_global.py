"""SwitchAll's entropy regulariser, global over the data-parallel batch: on 2 gloo ranks each
holding half the tokens, every rank's value equals one process's value over the union, and the
dp-averaged gradients (router weight; the input rows, scaled as the dp average scales them)
equal that process's gradients."""

from __future__ import annotations

import torch
from harness import run_distributed

from moe_dist.config import MoEConfig, RouterConfig
from moe_dist.models.switchhead import SigmaMoELayer

DP, T, D, E = 2, 6, 8, 5


def _inputs() -> tuple[SigmaMoELayer, torch.Tensor]:
    torch.manual_seed(0)
    layer = SigmaMoELayer(D, 16, MoEConfig(num_experts=E, expert_ffn_dim=4, router=RouterConfig(top_k=2)), 1.0)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
    return layer.train(), torch.randn(DP, 1, T, D) * torch.tensor([1.0, 3.0]).view(DP, 1, 1, 1)


def _rank_body(rank: int, world_size: int) -> dict:
    from moe_dist.distributed import comms
    from moe_dist.models.arch_parallel import GlobalLogSumExp

    layer, x_all = _inputs()
    layer.entropy_reduce_fn = GlobalLogSumExp(comms.world_group())
    x = x_all[rank].clone().requires_grad_(True)
    _, losses = layer(x)
    losses["entropy_reg"].backward()
    grad = comms.all_reduce(layer.router.weight.grad.clone(), "avg", comms.world_group())
    return {"value": losses["entropy_reg"].item(), "router_grad": grad, "x_grad": x.grad / world_size,
            "calls": layer.entropy_reduce_fn.calls}


def test_global_entropy_equals_the_union_batch_with_equal_gradients():
    results = run_distributed(_rank_body, DP, timeout=120)
    layer, x_all = _inputs()
    x = x_all.clone().requires_grad_(True)
    _, losses = layer(x.reshape(1, DP * T, D))
    losses["entropy_reg"].backward()
    for rank, got in enumerate(results):
        assert got["calls"] == 1
        torch.testing.assert_close(got["value"], losses["entropy_reg"].item(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["router_grad"], layer.router.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["x_grad"], x.grad[rank], rtol=1e-5, atol=1e-7)
    # Per-rank statistics would differ here (the ranks' inputs have different scales).
    local = [_local_value(r) for r in range(DP)]
    assert abs(local[0] - local[1]) > 1e-3


def _local_value(rank: int) -> float:
    layer, x_all = _inputs()
    return layer(x_all[rank])[1]["entropy_reg"].item()
