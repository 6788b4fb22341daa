"""CUDA fast paths of the MoE layer: Triton kernels and grouped_mm against the torch path, in
bf16 at realistic sizes, and no device-to-host synchronisation on the dropless path.

Tolerances: bf16 outputs are compared by relative Frobenius error (< 1e-2); integer results
(expert ids, counts) exactly.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from benchmarks.common import reference_kernels_only  # noqa: E402
from moe_dist.config import MoEConfig, RouterConfig  # noqa: E402
from moe_dist.moe.kernels import expert_ops, router_topk  # noqa: E402
from moe_dist.moe.kernels import permute as pk  # noqa: E402
from moe_dist.moe.layer import MoELayer  # noqa: E402

DEVICE = torch.device("cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def _layer(num_experts=16, top_k=4, dim=512, ffn=384, shared=1, seed=0, grouped_gemm="auto"):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=num_experts, expert_ffn_dim=ffn, num_shared_experts=shared, grouped_gemm=grouped_gemm,
                    router=RouterConfig(top_k=top_k, aux_loss_coef=0.01, z_loss_coef=1e-3))
    return MoELayer(dim, ffn, cfg).to(DEVICE, torch.bfloat16)


def test_kernels_match_references_bf16():
    torch.manual_seed(1)
    tokens, top_k, dim = 4096, 4, 1000
    y = torch.randn(tokens * top_k, dim, device=DEVICE, dtype=torch.bfloat16)
    order = torch.randperm(tokens * top_k, device=DEVICE)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=DEVICE)
    inv = inv.view(tokens, top_k)
    w = torch.rand(tokens, top_k, device=DEVICE)
    valid = torch.rand(tokens, top_k, device=DEVICE) > 0.1
    assert rel_err(pk.weighted_gather_sum(y, inv, w, valid), pk.weighted_gather_sum_ref(y, inv, w, valid)) < 1e-2
    src = order // top_k
    x = torch.randn(tokens, dim, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(pk.gather_rows(x, src), pk.gather_rows_ref(x, src))
    g = torch.randn(tokens, dim, device=DEVICE, dtype=torch.bfloat16)
    valid_n = valid.reshape(-1)[order]
    gy, gw = pk.scatter_grad(g, y, order, w, valid_n)
    ry, rw = pk.scatter_grad_ref(g, y, order, w, valid_n)
    assert rel_err(gy, ry) < 1e-2 and rel_err(gw, rw) < 1e-3

    logits = torch.randn(tokens, 64, device=DEVICE)
    probs, idx = router_topk.softmax_topk_forward(logits, 8)
    ref_probs, ref_idx = router_topk.softmax_topk_ref(logits, 8)
    assert torch.equal(idx, ref_idx)
    assert rel_err(probs, ref_probs) < 1e-5

    h = torch.randn(tokens, 2 * 1408, device=DEVICE, dtype=torch.bfloat16)
    assert rel_err(expert_ops.swiglu_forward(h), expert_ops.swiglu_ref(h)) < 1e-2


def test_layer_fast_path_matches_torch_path():
    layer = _layer()
    x = torch.randn(2, 1024, 512, device=DEVICE, dtype=torch.bfloat16)
    results = []
    for reference in (False, True):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if reference:
            with reference_kernels_only():
                out, losses = layer(xi)
                (out.float().square().mean() + sum(losses.values())).backward()
        else:
            out, losses = layer(xi)
            (out.float().square().mean() + sum(losses.values())).backward()
        results.append((out.detach(), xi.grad, layer.experts.w13.grad.clone(), layer.router.weight.grad.clone()))
    for got, want in zip(*results):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("grouped_gemm", ["auto", "triton_fused"])
def test_dropless_layer_has_no_host_sync(grouped_gemm):
    layer = _layer(num_experts=64, top_k=8, dim=256, ffn=128, shared=2, grouped_gemm=grouped_gemm)
    x = torch.randn(4, 512, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out, losses = layer(x)  # warm-up: kernel compilation (triton_fused: autotuning, which syncs), handles
    (out.float().sum() + sum(losses.values())).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, losses = layer(x)
        (out.float().sum() + sum(losses.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


def test_autocast_fp32_residual_takes_the_grouped_bf16_path():
    """An fp32 residual stream under autocast must reach the experts in bf16 (grouped_mm, no
    per-expert loop and so no host sync), with fp32 master weights."""
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=8, expert_ffn_dim=256, router=RouterConfig(top_k=2))
    layer = MoELayer(256, 256, cfg).to(DEVICE)  # fp32 parameters
    x = torch.randn(2, 256, 256, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = layer(x)  # warm-up
        out.float().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = layer(x)
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16
    assert layer.experts.w13.grad.dtype == torch.float32 and torch.isfinite(layer.experts.w13.grad).all()


def test_triton_fused_experts_match_grouped_mm_bf16():
    """The SwiGLU-epilogue grouped GEMMs against grouped_mm + the SwiGLU kernel, bf16, with an
    empty expert, uneven groups and NaN padding rows (never read: zero output, zero dx)."""
    from moe_dist.moe.experts import GroupedExperts

    torch.manual_seed(3)
    fused = GroupedExperts(8, 512, 384, backend="triton_fused").to(DEVICE, torch.bfloat16)
    plain = GroupedExperts(8, 512, 384, backend="grouped_mm").to(DEVICE, torch.bfloat16)
    plain.load_state_dict(fused.state_dict())
    counts = torch.tensor([700, 0, 1, 129, 64, 1000, 3, 151], device=DEVICE)
    real = int(counts.sum())
    x = torch.randn(real + 37, 512, device=DEVICE, dtype=torch.bfloat16)
    x[real:] = float("nan")
    g = torch.randn_like(x)
    results = []
    for experts in (fused, plain):
        xi = x.clone().requires_grad_(True)
        out = experts(xi, counts)
        out.backward(g)
        results.append((out, xi.grad, experts.w13.grad, experts.w2.grad))
    (out, dx, dw13, dw2), (ref_out, ref_dx, ref_dw13, ref_dw2) = results
    # The empty expert's weight gradients are zero on both paths (grouped_mm's K-grouped GEMM
    # must not leave an empty group's output undefined).
    for name, grad in (("fused w13", dw13), ("fused w2", dw2), ("grouped_mm w13", ref_dw13), ("grouped_mm w2", ref_dw2)):
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))
    assert torch.equal(dx[real:], torch.zeros_like(dx[real:]))
    assert rel_err(out[:real], ref_out[:real]) < 1e-2
    assert rel_err(dx[:real], ref_dx[:real]) < 1e-2
    assert rel_err(dw13, ref_dw13) < 1e-2 and rel_err(dw2, ref_dw2) < 1e-2
