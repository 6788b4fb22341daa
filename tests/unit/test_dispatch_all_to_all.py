"""Layout arithmetic of the all-to-all dispatcher, and its degree-1 path against LocalDispatcher.

The multi-rank behaviour is covered by tests/distributed/test_ep_parity.py; here the index maps
are checked against hand-worked examples.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.moe.dispatch.all_to_all import (AllToAllDispatcher, capacity_slots, local_expert_major_order,
                                             sorted_expert_ids)
from moe_dist.moe.capacity import apply_capacity
from moe_dist.moe.dispatch.local import LocalDispatcher
from moe_dist.moe.experts import GroupedExperts


def test_local_expert_major_order_docstring_example():
    # P=2 sources, L=2 local experts: src0 sends [3, 0], src1 sends [1, 1].
    recv_counts = torch.tensor([3, 0, 1, 1])
    order = local_expert_major_order(recv_counts, num_local_experts=2, num_recv=5)
    # received rows: 0,1,2 (src0,e0) 3 (src1,e0) 4 (src1,e1) -> e0: 0,1,2,3 then e1: 4
    assert order.tolist() == [0, 1, 2, 3, 4]
    recv_counts = torch.tensor([1, 2, 2, 1])  # src0: e0 x1, e1 x2; src1: e0 x2, e1 x1
    order = local_expert_major_order(recv_counts, num_local_experts=2, num_recv=6)
    # rows: 0 (s0e0) 1,2 (s0e1) 3,4 (s1e0) 5 (s1e1) -> e0: 0,3,4 ; e1: 1,2,5
    assert order.tolist() == [0, 3, 4, 1, 2, 5]


def test_local_expert_major_order_empty():
    order = local_expert_major_order(torch.zeros(4, dtype=torch.long), num_local_experts=2, num_recv=0)
    assert order.numel() == 0


def test_sorted_expert_ids_marks_invalid_tail():
    ids = sorted_expert_ids(torch.tensor([2, 0, 1]), num_rows=5)
    assert ids.tolist() == [0, 0, 2, 3, 3]


def test_capacity_slots_hand_example():
    # E=3, C=2; counts [3, 0, 1] with one invalid row: permuted rows 0,1,2 (e0) 3 (e2) 4 (invalid)
    src, slot = capacity_slots(torch.tensor([3, 0, 1]), capacity=2, num_rows=5)
    assert src.tolist() == [[0, 1], [5, 5], [3, 5]]  # 5 = appended zero row
    assert slot.tolist() == [0, 1, 6, 4, 6]  # row 2 is over capacity, row 4 invalid -> trash 6


def _route(num_tokens: int, num_experts: int, top_k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, indices = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return indices, weights


def _run(dispatcher, experts, x, indices, weights, valid):
    expert_in, counts, handle = dispatcher.dispatch(x, indices, valid)
    return dispatcher.combine(experts(expert_in, counts), weights, handle)


def test_degree_one_matches_local_dispatcher_both_modes():
    torch.manual_seed(0)
    num_tokens, num_experts, top_k, dim = 12, 4, 2, 8
    experts = GroupedExperts(num_experts, dim, 16, backend="loop")
    x = torch.randn(num_tokens, dim, requires_grad=True)
    indices, weights = _route(num_tokens, num_experts, top_k, seed=1)
    capacity = 4
    valid = apply_capacity(indices, None, num_experts, capacity)
    weights = torch.where(valid, weights, 0.0)
    ref = _run(LocalDispatcher(num_experts), experts, x, indices, weights, valid)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
    for capacity_fn in (None, lambda t, k: capacity):
        dispatcher = AllToAllDispatcher(num_experts, None, 0, 1, capacity_fn=capacity_fn)
        out = _run(dispatcher, experts, x, indices, weights, valid)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grad, grad_ref)
        assert dispatcher.host_syncs == (1 if capacity_fn is None else 0)


def test_degree_one_all_tokens_on_one_expert():
    num_tokens, num_experts, dim = 6, 4, 8
    experts = GroupedExperts(num_experts, dim, 16, backend="loop")
    x = torch.randn(num_tokens, dim)
    indices = torch.zeros(num_tokens, 1, dtype=torch.long)
    weights = torch.ones(num_tokens, 1)
    ref = _run(LocalDispatcher(num_experts), experts, x, indices, weights, None)
    out = _run(AllToAllDispatcher(num_experts, None, 0, 1), experts, x, indices, weights, None)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("max_key", [3, 255, 256, 40_000, 2**31])
def test_stable_argsort_small_equals_the_int64_stable_sort(max_key):
    """Narrowed keys (uint8, int16, int32, or int64 past those) give the same stable order,
    ties in input order, at each dtype boundary."""
    from moe_dist.moe.dispatch.permutation import stable_argsort_small

    gen = torch.Generator().manual_seed(max_key % 1000)
    keys = torch.randint(0, min(max_key, 50) + 1, (500,), generator=gen)
    keys[::7] = max_key  # the largest key must survive the narrowing
    want = torch.argsort(keys, stable=True)
    assert torch.equal(stable_argsort_small(keys, max_key), want)
