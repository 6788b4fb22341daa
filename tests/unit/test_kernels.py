"""Triton kernels against their torch references, on CPU through TRITON_INTERPRET=1.

Sizes are tiny (the interpreter runs each program in Python) and deliberately awkward:
hidden sizes that are not powers of two, invalid slots, padding rows, an expert with no rows.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moe_dist.moe import experts  # noqa: E402
from moe_dist.moe.dispatch import permutation as dispatch  # noqa: E402
from moe_dist.moe.kernels import expert_ops, router_topk  # noqa: E402
from moe_dist.moe.kernels import permute as pk  # noqa: E402


def _routing(gen, num_tokens=7, top_k=3, num_experts=5, with_valid=True):
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    indices = scores.topk(top_k, dim=-1).indices
    indices[:, 0] = 0  # expert 0 is busy, the last expert may stay empty
    indices[:, 1:] = torch.where(indices[:, 1:] == 0, 1, indices[:, 1:])
    valid = torch.rand(num_tokens, top_k, generator=gen) > 0.3 if with_valid else None
    weights = torch.rand(num_tokens, top_k, generator=gen)
    if valid is not None:
        weights = torch.where(valid, weights, 0.0)
    return indices, valid, weights


@pytest.mark.parametrize("with_valid", [False, True])
def test_permute_unpermute_fast_path_matches_torch_path(monkeypatch, with_valid):
    gen = torch.Generator().manual_seed(1)
    num_experts, dim = 5, 40
    indices, valid, weights = _routing(gen, num_experts=num_experts, with_valid=with_valid)
    x = torch.randn(7, dim, generator=gen)
    expert_scale = torch.randn(7 * 3, 1, generator=gen)
    grad_out = torch.randn(7, dim, generator=gen)

    def run(fast: bool):
        monkeypatch.setattr(dispatch, "use_fast_kernels", lambda t: fast)
        x_ = x.clone().requires_grad_(True)
        w_ = weights.clone().requires_grad_(True)
        x_sorted, counts, state = dispatch.permute(x_, indices, num_experts, valid)
        y = dispatch.unpermute(x_sorted * expert_scale, w_, state)
        y.backward(grad_out)
        return x_sorted.detach(), counts, y.detach(), x_.grad, w_.grad

    fast, ref = run(True), run(False)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0])
    for got, want in zip(fast[2:], ref[2:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unpermute_ignores_garbage_in_invalid_rows(monkeypatch):
    """Invalid rows may hold anything (grouped_mm padding); the fused combine must not read them."""
    gen = torch.Generator().manual_seed(2)
    indices, valid, weights = _routing(gen)
    x = torch.randn(7, 24, generator=gen)
    monkeypatch.setattr(dispatch, "use_fast_kernels", lambda t: True)
    x_sorted, counts, state = dispatch.permute(x, indices, 5, valid)
    y_rows = x_sorted.clone()
    y_rows[int(counts.sum()):] = float("nan")
    w = weights.clone().requires_grad_(True)
    out = dispatch.unpermute(y_rows, w, state)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()
    expected = (x.unsqueeze(1) * torch.where(valid, weights, 0.0).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out, expected)


def test_gather_kernels_bf16_accumulate_in_fp32():
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(12, 33, generator=gen).bfloat16()
    inv = torch.randperm(12, generator=gen).view(6, 2)
    w = torch.rand(6, 2, generator=gen)
    got = pk.weighted_gather_sum(y, inv, w)
    want = pk.weighted_gather_sum_ref(y, inv, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    src = torch.randint(0, 12, (9,), generator=gen)
    assert torch.equal(pk.gather_rows(y, src), pk.gather_rows_ref(y, src))


@pytest.mark.parametrize("num_experts,top_k,with_bias", [(8, 2, False), (6, 3, True), (64, 8, False)])
def test_softmax_topk_matches_reference(num_experts, top_k, with_bias):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, num_experts, generator=gen, requires_grad=True)
    bias = torch.randn(num_experts, generator=gen) * 0.1 if with_bias else None
    probs, idx = router_topk.softmax_topk(logits, top_k, bias)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_probs, ref_idx = router_topk.softmax_topk_ref(ref_logits, top_k, bias)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(probs, ref_probs)
    upstream = torch.randn(5, num_experts, generator=gen)
    (probs * upstream).sum().backward()
    (ref_probs * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_softmax_topk_ties_pick_lower_id_like_topk():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    _, idx = router_topk.softmax_topk_forward(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]


def test_swiglu_forward_backward():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 2 * 20, generator=gen, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_(True)
    g = torch.randn(6, 20, generator=gen)
    out, ref = expert_ops.swiglu(h), expert_ops.swiglu_ref(h_ref)
    torch.testing.assert_close(out, ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("offsets", [[3, 5, 5], [0, 0], [9, 9], []])
def test_zero_rows_from(offsets):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 37, generator=gen)
    offs = torch.tensor(offsets, dtype=torch.int32)
    assert torch.equal(expert_ops.zero_rows_from_(x.clone(), offs), expert_ops.zero_rows_from_ref(x.clone(), offs))


def test_grouped_experts_fast_path_matches_loop(monkeypatch):
    """Tail zeroing + fused SwiGLU around torch._grouped_mm equal the per-expert loop,
    padding rows included (zero output, zero input gradient)."""
    if not experts._HAS_GROUPED_MM:
        pytest.skip("torch._grouped_mm missing")
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    fast = experts.GroupedExperts(3, 16, 24, backend="grouped_mm")
    loop = experts.GroupedExperts(3, 16, 24, backend="loop")
    loop.load_state_dict(fast.state_dict())
    counts = torch.tensor([4, 0, 3])  # 10 rows: 7 real, 3 padding
    x = torch.randn(10, 16, generator=gen)
    x[7:] = float("nan")  # padding rows may hold anything
    monkeypatch.setattr(experts, "_use_fast_kernels", lambda t: True)
    x_fast, x_loop = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fast, out_loop = fast(x_fast, counts), loop(x_loop, counts)
    g = torch.randn(10, 16, generator=gen)
    out_fast.backward(g)
    out_loop.backward(g)
    assert torch.equal(out_fast[7:], torch.zeros(3, 16))
    assert torch.equal(x_fast.grad[7:], torch.zeros(3, 16))
    torch.testing.assert_close(out_fast[:7], out_loop[:7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_fast.grad[:7], x_loop.grad[:7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.w13.grad, loop.w13.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.w2.grad, loop.w2.grad, rtol=1e-4, atol=1e-5)


def _fused_and_loop_experts(num_experts: int, dim: int, ffn: int, activation: str = "swiglu"):
    torch.manual_seed(8)
    fused = experts.GroupedExperts(num_experts, dim, ffn, backend="triton_fused", activation=activation)
    loop = experts.GroupedExperts(num_experts, dim, ffn, backend="loop", activation=activation)
    loop.load_state_dict(fused.state_dict())
    return fused, loop


@pytest.mark.parametrize("counts,dim", [([19, 0, 5, 3], 40), ([19, 0, 5, 3], 32), ([0, 0, 0, 0], 40),
                                        ([40, 0, 0, 0], 32)])
def test_triton_fused_experts_match_loop(monkeypatch, counts, dim):
    """The SwiGLU-epilogue grouped GEMMs: a group spanning several row blocks, an empty group,
    odd widths (masked K and N tails) and NaN padding rows, against the per-expert loop."""
    if not experts._HAS_GROUPED_MM:
        pytest.skip("torch._grouped_mm missing")
    gen = torch.Generator().manual_seed(9)
    fused, loop = _fused_and_loop_experts(4, dim, 36)  # dim 32: no K tail (BLOCK_K 16 divides it)
    counts = torch.tensor(counts)
    real = int(counts.sum())
    x = torch.randn(real + 5, dim, generator=gen)
    x[real:] = float("nan")
    monkeypatch.setattr(experts, "_use_fast_kernels", lambda t: True)
    calls = []
    monkeypatch.setattr(experts.grouped_swiglu, "fused_swiglu_experts",
                        lambda *a, _f=experts.grouped_swiglu.fused_swiglu_experts: calls.append(1) or _f(*a))
    x_fused, x_loop = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fused, out_loop = fused(x_fused, counts), loop(x_loop, counts)
    g = torch.randn(real + 5, dim, generator=gen)
    out_fused.backward(g)
    out_loop.backward(g)
    assert calls == [1]
    assert torch.equal(out_fused[real:], torch.zeros(5, dim))
    assert torch.equal(x_fused.grad[real:], torch.zeros(5, dim))
    torch.testing.assert_close(out_fused[:real], out_loop[:real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_fused.grad[:real], x_loop.grad[:real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.w13.grad, loop.w13.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.w2.grad, loop.w2.grad, rtol=1e-4, atol=1e-5)


def test_triton_fused_backend_leaves_relu_experts_and_the_cpu_path_to_grouped_mm(monkeypatch):
    if not experts._HAS_GROUPED_MM:
        pytest.skip("torch._grouped_mm missing")
    calls = []
    monkeypatch.setattr(experts.grouped_swiglu, "fused_swiglu_experts", lambda *a: calls.append(1))
    counts = torch.tensor([3, 2])
    x = torch.randn(5, 16)
    relu_fused, relu_loop = _fused_and_loop_experts(2, 16, 8, activation="relu")
    monkeypatch.setattr(experts, "_use_fast_kernels", lambda t: True)
    torch.testing.assert_close(relu_fused(x, counts), relu_loop(x, counts))
    monkeypatch.setattr(experts, "_use_fast_kernels", lambda t: False)  # CPU without Triton: 'auto'
    swiglu_fused, swiglu_loop = _fused_and_loop_experts(2, 16, 8)
    torch.testing.assert_close(swiglu_fused(x, counts), swiglu_loop(x, counts))
    assert calls == []


def test_triton_fused_experts_compute_only_the_gradients_asked_for(monkeypatch):
    """Input rows without a gradient (the weights still get theirs), and frozen experts (the
    input gradient alone): each equals the loop's."""
    if not experts._HAS_GROUPED_MM:
        pytest.skip("torch._grouped_mm missing")
    gen = torch.Generator().manual_seed(10)
    counts = torch.tensor([7, 0, 18, 2])
    x = torch.randn(29, 32, generator=gen)
    g = torch.randn(29, 32, generator=gen)
    monkeypatch.setattr(experts, "_use_fast_kernels", lambda t: True)
    fused, loop = _fused_and_loop_experts(4, 32, 20)
    fused(x, counts).backward(g)
    loop(x, counts).backward(g)
    torch.testing.assert_close(fused.w13.grad, loop.w13.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.w2.grad, loop.w2.grad, rtol=1e-4, atol=1e-5)
    fused, loop = _fused_and_loop_experts(4, 32, 20)
    for module in (fused, loop):
        module.requires_grad_(False)
    x_fused, x_loop = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused(x_fused, counts).backward(g)
    loop(x_loop, counts).backward(g)
    torch.testing.assert_close(x_fused.grad, x_loop.grad, rtol=1e-4, atol=1e-5)
    assert fused.w13.grad is None and fused.w2.grad is None
