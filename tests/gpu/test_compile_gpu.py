"""The MoE layer's Triton custom ops under Inductor: ``torch.compile(fullgraph=True)`` of an MoE
layer plus the fused cross-entropy must trace without a graph break (fullgraph raises on one)
and match eager, forward and backward, in bf16 (relative Frobenius error < 2e-2)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_dist.config import CapacityConfig, MoEConfig, RouterConfig  # noqa: E402
from moe_dist.models.cross_entropy import token_cross_entropy  # noqa: E402
from moe_dist.moe.layer import MoELayer  # noqa: E402

DEVICE = torch.device("cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def test_moe_layer_and_loss_compile_fullgraph_and_match_eager():
    torch.manual_seed(0)
    dim, vocab = 256, 1000
    cfg = MoEConfig(num_experts=8, expert_ffn_dim=192, num_shared_experts=1,
                    router=RouterConfig(top_k=2), capacity=CapacityConfig(policy="dropless"))
    layer = MoELayer(dim, 192, cfg).to(DEVICE, torch.bfloat16).eval()  # eval: no load statistics
    head = torch.randn(vocab, dim, device=DEVICE, dtype=torch.bfloat16) * dim**-0.5
    x = torch.randn(2, 256, dim, device=DEVICE, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (2, 256), device=DEVICE)

    def loss_fn(x_in: torch.Tensor) -> torch.Tensor:
        out, _ = layer(x_in)
        return token_cross_entropy(out @ head.T, targets)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        loss = fn(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad, layer.experts.w13.grad.clone(), layer.router.weight.grad.clone()))
    for want, got in zip(*results):
        assert rel_err(got, want) < 2e-2
