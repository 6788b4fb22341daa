"""Grouped-GEMM experts against a per-expert loop; permute/unpermute; capacity rules."""

import pytest
import torch

from moe_dist.config import CapacityConfig, MoEConfig, RouterConfig
from moe_dist.moe import capacity as cap
from moe_dist.moe.dispatch.permutation import permute, unpermute
from moe_dist.moe.experts import GroupedExperts, grouped_mm_supported
from moe_dist.moe.layer import MoELayer


def _reference_experts(x, experts, indices, weights):
    """Token by token, expert by expert: the definition of an MoE MLP."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = indices[t, k].item()
            gate, up = (x[t] @ experts.w13[e]).chunk(2)
            out[t] += weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ experts.w2[e])
    return out


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_grouped_experts_match_the_per_token_reference(backend):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32, backend=backend)
    x = torch.randn(10, 16, requires_grad=True)
    indices = torch.randint(0, 4, (10, 2))
    indices[:, 1] = (indices[:, 0] + 1) % 4
    indices[indices == 3] = 2  # expert 3 gets no token
    weights = torch.rand(10, 2)
    x_sorted, counts, state = permute(x, indices, 4)
    assert counts[3] == 0
    out = unpermute(experts(x_sorted, counts), weights, state)
    ref_x = x.detach().clone().requires_grad_()
    ref = _reference_experts(ref_x, experts, indices, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    grads = [p.grad.clone() for p in (experts.w13, experts.w2)]
    experts.zero_grad()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    for got, param in zip(grads, (experts.w13, experts.w2)):
        torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-6)


def test_grouped_mm_and_loop_agree_with_sum_backward():
    torch.manual_seed(1)
    assert grouped_mm_supported(torch.zeros(1, 16), torch.zeros(2, 16, 32))
    fast, slow = GroupedExperts(3, 16, 16, "grouped_mm"), GroupedExperts(3, 16, 16, "loop")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(12, 16)
    counts = torch.tensor([5, 0, 7])
    a, b = fast(x, counts), slow(x, counts)
    torch.testing.assert_close(a, b)
    a.sum().backward()  # an expanded gradient: must not break grouped_mm's backward
    b.sum().backward()
    torch.testing.assert_close(fast.w13.grad, slow.w13.grad)


def test_odd_widths_are_padded_into_grouped_mm_and_match_the_loop():
    assert not grouped_mm_supported(torch.zeros(1, 10), torch.zeros(2, 10, 7))
    torch.manual_seed(2)
    padded, loop = GroupedExperts(3, 10, 7), GroupedExperts(3, 10, 7, "loop")
    loop.load_state_dict(padded.state_dict())
    x = torch.randn(9, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    counts = torch.tensor([1, 3, 4])  # the last row is padding and must come back as zeros
    out, ref = padded(x, counts), loop(x_ref, counts)
    assert out.shape == (9, 10) and not out[8].any()
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for a, b in zip((padded.w13, padded.w2), (loop.w13, loop.w2)):
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad)


def test_padding_is_taken_only_where_grouped_mm_takes_the_dtype(monkeypatch):
    from moe_dist.moe import experts as experts_module
    calls = []
    monkeypatch.setattr(experts_module, "_loop_matmul", lambda *a: calls.append("loop") or a[0][:, :7] * 0)
    experts_module.grouped_matmul(torch.randn(4, 10), torch.randn(2, 10, 7), torch.tensor([1, 3]))
    assert calls == []  # fp32 on CPU: padded grouped_mm
    experts_module.grouped_matmul(torch.randn(4, 10).double(), torch.randn(2, 10, 7).double(),
                                  torch.tensor([1, 3]))
    assert calls == ["loop"]  # float64: grouped_mm does not take it at any width


def test_capacity_formula_and_priority():
    assert cap.expert_capacity(4096, 64, 1, 1.25) == 80  # Switch: C = 1.25 * 4096 / 64
    # 3 tokens, top-2; expert 0 is everybody's first choice, capacity 2
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    positions = cap.positions_in_expert(indices, 3)
    assert positions[:, 0].tolist() == [0, 1, 2]
    assert positions[:, 1].tolist() == [0, 0, 1]  # second choices count separately per expert
    kept = cap.apply_capacity(indices, None, 3, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True]]
    # score priority: the highest-scoring first choice wins
    scores = torch.tensor([[0.2, 0.1], [0.9, 0.05], [0.5, 0.3]])
    kept = cap.apply_capacity(indices, None, 3, capacity=2, scores_TK=scores)
    assert kept[:, 0].tolist() == [False, True, True]


def test_second_choices_queue_behind_all_first_choices():
    indices = torch.tensor([[1, 0], [0, 1]])  # token 0's second choice and token 1's first both hit expert 0
    positions = cap.positions_in_expert(indices, 2)
    assert positions[1, 0].item() == 0 and positions[0, 1].item() == 1


def test_moe_layer_fixed_capacity_drops_and_counts():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, router=RouterConfig(top_k=1),
                    capacity=CapacityConfig(policy="fixed", capacity_factor=0.5))
    layer = MoELayer(16, 32, cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 picks expert 0
    x = torch.randn(1, 16, 16).abs()
    out, _ = layer(x)
    capacity = cap.expert_capacity(16, 4, 1, 0.5)  # 2
    assert layer.stats.routed[0].item() == 16 and layer.stats.kept[0].item() == capacity
    assert (out.view(16, 16).abs().sum(-1) > 0).sum().item() == capacity  # dropped tokens output 0


def test_moe_layer_all_tokens_on_one_expert_does_not_crash():
    layer = MoELayer(16, 32, MoEConfig(num_experts=4, router=RouterConfig(top_k=2)))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, :] = 5.0
        layer.router.weight[1, :] = 4.0
    out, losses = layer(torch.ones(2, 3, 16))
    out.sum().backward()
    assert layer.stats.kept.tolist() == [6, 6, 0, 0]
    assert torch.isfinite(out).all() and layer.experts.w13.grad[2].abs().sum() == 0


def test_score_priority_keeps_the_higher_gate_in_a_near_tie():
    from moe_dist.moe.capacity import apply_capacity

    # Both tokens pick expert 0 first; gates 1.2e-7 apart. Capacity 1 keeps the higher one
    # (token 1), as megatron-core and DeepSpeed do.
    indices = torch.tensor([[0, 1], [0, 1]])
    gates = torch.tensor([[0.5, 0.2], [0.5 + 1.2e-7, 0.2]])
    assert gates[1, 0] > gates[0, 0]
    kept = apply_capacity(indices, None, num_experts=2, capacity=1, scores_TK=gates)
    assert kept.tolist() == [[False, True], [True, False]]
    # Every first choice still precedes every second choice, whatever the gates.
    kept = apply_capacity(torch.tensor([[0, 1], [1, 0]]), None, 2, 1, torch.tensor([[0.1, 0.9], [0.2, 0.8]]))
    assert kept.tolist() == [[True, False], [True, False]]
