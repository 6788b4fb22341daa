"""The Triton custom ops under torch.compile and fake tensors, on CPU (TRITON_INTERPRET=1).

* ``opcheck``: each ``moe_dist::*`` op's schema, autograd registration and fake implementation
  (the op body on fake tensors must give the eager outputs' shapes, dtypes and strides).
* The MoE layer on its CUDA fast path (patched on for CPU tensors, kernels interpreted) compiles
  with ``fullgraph=True``: a graph break at any kernel launch would raise. Dynamo only
  (backend "eager"): AOTAutograd cannot record an interpreted kernel (``launch.py``).
* The MoE layer on its CPU torch path (fp32) compiles (backend "aot_eager") and matches eager.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moe_dist.config import CapacityConfig, MoEConfig, RouterConfig  # noqa: E402
from moe_dist.models import cross_entropy  # noqa: E402
from moe_dist.moe import experts  # noqa: E402
from moe_dist.moe.dispatch import permutation as dispatch  # noqa: E402
from moe_dist.moe.routing import top_k as router  # noqa: E402
from moe_dist.moe.kernels import expert_ops, grouped_swiglu, router_topk  # noqa: E402
from moe_dist.moe.kernels import permute as pk  # noqa: E402
from moe_dist.moe.layer import MoELayer  # noqa: E402

# AOTAutograd-based checks need a recorded kernel; the interpreter cannot give one.
_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_permute_ops_opcheck():
    gen = _gen(0)
    order = torch.randperm(8, generator=gen)  # 4 tokens x 2 slots
    inv = torch.empty_like(order)
    inv[order] = torch.arange(8)
    inv = inv.view(4, 2)
    valid_TK = torch.rand(4, 2, generator=gen) > 0.3
    valid_N = valid_TK.reshape(-1)[order].contiguous()
    x = torch.randn(4, 12, generator=gen, requires_grad=True)
    y = torch.randn(8, 12, generator=gen, requires_grad=True)
    w = torch.rand(4, 2, generator=gen, requires_grad=True)
    g = torch.randn(4, 12, generator=gen)
    cases = [
        (pk._gather_rows_op, (x.detach(), order // 2, valid_N)),
        (pk._weighted_gather_sum_op, (y.detach(), inv, w.detach(), valid_TK)),
        (pk._weighted_gather_sum_op, (y.detach(), inv, None, None)),
        (pk._scatter_grad_op, (g, y.detach(), order, w.detach(), valid_N)),
        (pk._permute_rows_op, (x, order, inv, valid_TK)),
        (pk._unpermute_weighted_op, (y, w, order, inv, valid_N, valid_TK)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=_CHECKS)


def test_router_and_expert_ops_opcheck():
    gen = _gen(1)
    logits = torch.randn(5, 6, generator=gen, requires_grad=True)
    torch.library.opcheck(router_topk._softmax_topk_op, (logits, 2, torch.randn(6, generator=gen)),
                          test_utils=_CHECKS)
    h = torch.randn(3, 2 * 10, generator=gen, requires_grad=True)
    torch.library.opcheck(expert_ops._swiglu_forward_op, (h,), test_utils=_CHECKS)
    torch.library.opcheck(expert_ops._swiglu_backward_op, (h.detach(), torch.randn(3, 10, generator=gen)),
                          test_utils=_CHECKS)
    buf = torch.randn(7, 9, generator=gen)
    torch.library.opcheck(expert_ops._zero_rows_from_op, (buf, torch.tensor([2, 5], dtype=torch.int32)),
                          test_utils=_CHECKS)


def test_cross_entropy_op_opcheck():
    gen = _gen(2)
    logits = torch.randn(4, 37, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 36, -100, 5])
    torch.library.opcheck(cross_entropy._ce_rows_op, (logits, targets, -100, 16, 4), test_utils=_CHECKS)


def test_fused_cross_entropy_compiles_fullgraph():
    gen = _gen(3)
    logits = torch.randn(2, 3, 29, generator=gen)
    targets = torch.randint(0, 29, (2, 3), generator=gen)
    compiled = torch.compile(cross_entropy.fused_cross_entropy, fullgraph=True, backend="eager")
    x_eager, x_comp = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    want, got = cross_entropy.fused_cross_entropy(x_eager, targets), compiled(x_comp, targets)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


def _layer(seed: int, grouped_gemm: str = "grouped_mm") -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=4, expert_ffn_dim=16, grouped_gemm=grouped_gemm,
                    router=RouterConfig(top_k=2), capacity=CapacityConfig(policy="dropless"))
    return MoELayer(16, 16, cfg)


def _run(layer, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.experts.w13.grad.clone(), layer.router.weight.grad.clone()


@pytest.mark.parametrize("grouped_gemm", ["grouped_mm", "triton_fused"])
def test_moe_layer_fast_path_compiles_without_graph_breaks(monkeypatch, grouped_gemm):
    """Both expert backends of the fast path. Compiled against eager only: the interpreter's
    bf16 tl.dot is wrong (Triton 3.9 on CPU), so triton_fused's numerics are checked in fp32
    (test_kernels.py) and in bf16 on the GPU."""
    if not experts._HAS_GROUPED_MM:
        pytest.skip("torch._grouped_mm missing")
    for module, name in ((dispatch, "use_fast_kernels"), (router, "use_fast_kernels"),
                         (experts, "_use_fast_kernels")):
        monkeypatch.setattr(module, name, lambda t: True)
    calls = []
    monkeypatch.setattr(experts.grouped_swiglu, "fused_swiglu_experts",
                        lambda *a, _f=grouped_swiglu.fused_swiglu_experts: calls.append(1) or _f(*a))
    torch._dynamo.reset()
    gen = _gen(4)
    # bf16: the fake (meta) kernel of torch._grouped_mm accepts bf16 operands only
    x = torch.randn(2, 5, 16, generator=gen).bfloat16()
    grad = torch.randn(2, 5, 16, generator=gen).bfloat16()
    # eval: no load-statistics bincount (its output size depends on the data)
    eager = _layer(5, grouped_gemm).bfloat16().eval()
    compiled = _layer(5, grouped_gemm).bfloat16().eval()
    want = _run(eager, x, grad)
    got = _run(torch.compile(compiled, fullgraph=True, backend="eager"), x, grad)
    # triton_fused: eager, and once while Dynamo traced the compiled layer
    assert len(calls) == (2 if grouped_gemm == "triton_fused" else 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_moe_layer_torch_path_compiles_on_cpu():
    torch._dynamo.reset()
    gen = _gen(6)
    x, grad = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    # "auto": torch._grouped_mm in eager; the per-expert loop while compiling (fp32)
    eager, compiled = _layer(7, "auto"), _layer(7, "auto")
    want = _run(eager, x, grad)
    got = _run(torch.compile(compiled, backend="aot_eager"), x, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_swiglu_ops_opcheck():
    gen = _gen(8)
    offsets = torch.tensor([5, 5, 9], dtype=torch.int32)
    x = torch.randn(11, 24, generator=gen)
    w13 = torch.randn(3, 24, 2 * 20, generator=gen)
    w2 = torch.randn(3, 20, 24, generator=gen)
    torch.library.opcheck(grouped_swiglu._gate_up_swiglu_op, (x, w13, offsets), test_utils=_CHECKS)
    h = torch.randn(11, 40, generator=gen)
    torch.library.opcheck(grouped_swiglu._swiglu_input_grad_op, (torch.randn(11, 24, generator=gen), w2, h, offsets),
                          test_utils=_CHECKS)
