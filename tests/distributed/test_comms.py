"""comms on 2 and 4 gloo ranks: values and gradients against hand-computed expectations."""

from __future__ import annotations

import torch
from harness import run_distributed

D = 3  # features per row


def _rows(src: int, dst: int, n: int) -> torch.Tensor:
    """Row i sent from src to dst holds [100*src + 10*dst + i, ... + 0.5, -(...)]."""
    base = torch.tensor([100.0 * src + 10.0 * dst + i for i in range(n)]).unsqueeze(1)
    return torch.cat([base, base + 0.5, -base], dim=1)


def _check_a2a(rank: int, sends: list[list[int]], group, ranks: list[int]) -> dict:
    """sends[s][d]: rows group member s sends to member d. Checks values and gradients."""
    from moe_dist.distributed import comms

    me = ranks.index(rank)
    w = len(ranks)
    in_splits = sends[me]
    out_splits = [sends[s][me] for s in range(w)]
    x = torch.cat([_rows(ranks[me], ranks[d], in_splits[d]) for d in range(w)]).requires_grad_(True)
    assert x.shape == (sum(in_splits), D)
    record = comms.CollectiveRecord()
    y = comms.AllToAll.apply(x, out_splits, in_splits, group, record)
    expected = torch.cat([_rows(ranks[s], rank, sends[s][me]) for s in range(w)])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # Output row p on member d gets weight (d + 1) * (p + 1); the gradient of an input row is
    # the weight of the slot it landed in.
    weight = torch.tensor([(me + 1.0) * (p + 1) for p in range(y.shape[0])]).unsqueeze(1)
    (y * weight).sum().backward()
    grad = []
    for d in range(w):
        offset = sum(sends[s][d] for s in range(me))  # rows of lower members land first
        grad += [[(d + 1.0) * (offset + i + 1)] * D for i in range(in_splits[d])]
    expected_grad = torch.tensor(grad).reshape(-1, D)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)
    # The backward a2a was recorded last, with the forward's splits swapped.
    assert record.summary().endswith(f"input_splits {out_splits}, output_splits {in_splits}"), \
        record.summary()
    assert "all_to_all(backward)" in record.summary()
    return {"rows_in": x.shape[0], "rows_out": y.shape[0], "record_count": record.count}


def _world2(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from moe_dist.distributed import comms

    world = comms.world_group()
    assert world is dist.group.WORLD
    out = {}
    # Rank 1 receives zero rows; rank 0 receives 3 from itself and 1 from rank 1.
    out["a2a"] = _check_a2a(rank, [[3, 0], [1, 0]], world, [0, 1])
    # Written out by hand for world 2: rank 0 sends rows a,b to itself and c to rank 1.
    x = torch.tensor([[1.0], [2.0], [3.0]]) if rank == 0 else torch.tensor([[4.0], [5.0]])
    x.requires_grad_(True)
    in_splits = [2, 1] if rank == 0 else [0, 2]
    out_splits = [2, 0] if rank == 0 else [1, 2]
    y = comms.all_to_all(x, out_splits, in_splits, world)
    torch.testing.assert_close(y, torch.tensor([[1.0], [2.0]]) if rank == 0
                               else torch.tensor([[3.0], [4.0], [5.0]]))
    (y * torch.arange(1.0, y.shape[0] + 1).unsqueeze(1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0], [2.0], [1.0]]) if rank == 0
                               else torch.tensor([[2.0], [3.0]]))

    # Plain collectives.
    t = torch.tensor([rank + 1.0, 10.0])
    comms.all_reduce(t, "sum", world)
    torch.testing.assert_close(t, torch.tensor([3.0, 20.0]))
    comms.all_reduce(t, op="avg", group=world)
    torch.testing.assert_close(t, torch.tensor([3.0, 20.0]))
    t = torch.tensor([float(rank)])
    comms.all_reduce(t, op="max", group=world)
    assert t.item() == 1.0
    gathered = comms.all_gather_into_tensor(torch.empty(4), torch.tensor([rank, rank + 0.5]), world)
    torch.testing.assert_close(gathered, torch.tensor([0.0, 0.5, 1.0, 1.5]))
    scattered = comms.reduce_scatter_tensor(torch.empty(2), torch.arange(4.0) * (rank + 1), world)
    torch.testing.assert_close(scattered, torch.tensor([0.0, 3.0]) if rank == 0 else torch.tensor([6.0, 9.0]))

    # Autograd TP / SP collectives. c[r] is a rank-specific upstream weight.
    c = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]
    a = torch.tensor([[1.0, -1.0], [0.5, 2.0]])

    x = (a * (rank + 1)).requires_grad_(True)
    y = comms.all_reduce_forward(x, world)
    torch.testing.assert_close(y, 3 * a)
    (y * c[rank]).sum().backward()
    torch.testing.assert_close(x.grad, c[rank])  # identity backward

    x = a.clone().requires_grad_(True)
    y = comms.all_reduce_backward(x, world)
    torch.testing.assert_close(y, a)
    (y * c[rank]).sum().backward()
    torch.testing.assert_close(x.grad, c[0] + c[1])

    x = (a + 10 * rank).requires_grad_(True)  # [2, 2]; gather along dim 1 -> [2, 4]
    y = comms.gather_forward_split_backward(x, 1, world)
    torch.testing.assert_close(y, torch.cat([a, a + 10], dim=1))
    full_c = torch.cat(c, dim=1)  # same upstream weight on every rank
    (y * full_c).sum().backward()
    torch.testing.assert_close(x.grad, c[rank])

    x = (a + 10 * rank).requires_grad_(True)  # sequence-parallel gather along dim 0 -> [4, 2]
    y = comms.gather_forward_reduce_scatter_backward(x, 0, world)
    torch.testing.assert_close(y, torch.cat([a, a + 10], dim=0))
    upstream = torch.cat(c, dim=0) * (rank + 1)  # partial gradients differ per rank
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, c[rank] * 1 + c[rank] * 2)

    full = torch.cat([a, a + 10], dim=0)  # [4, 2], replicated
    x = full.clone().requires_grad_(True)
    y = comms.split_forward_gather_backward(x, 0, world)
    torch.testing.assert_close(y, a + 10 * rank)
    (y * c[rank]).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat(c, dim=0))

    x = (full * (rank + 1)).requires_grad_(True)  # partial sums; reduce-scatter along dim 0
    y = comms.reduce_scatter_forward_gather_backward(x, 0, world)
    torch.testing.assert_close(y, 3 * (a + 10 * rank))
    (y * c[rank]).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat(c, dim=0))
    return out


def _world4(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from moe_dist.config import ParallelConfig
    from moe_dist.distributed import comms
    from moe_dist.distributed.mesh import build_mesh

    out = {}
    # Rank 2 sends nothing and receives nothing; rank 1 sends only to rank 3.
    sends = [[1, 2, 0, 1], [0, 0, 0, 3], [0, 0, 0, 0], [2, 1, 0, 2]]
    out["a2a"] = _check_a2a(rank, sends, dist.group.WORLD, [0, 1, 2, 3])

    # exchange_counts: 8 experts, 2 per rank; rank r sends 10*r + e rows to expert e.
    counts = torch.tensor([10 * rank + e for e in range(8)], dtype=torch.int64)
    got = comms.exchange_counts(counts, dist.group.WORLD)
    expected = torch.tensor([10 * src + 2 * rank + local for src in range(4) for local in range(2)])
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, expected)

    # On an ep=2 sub-group ([0,1] and [2,3]) splits are indexed by group rank.
    mesh = build_mesh(ParallelConfig(dp=4, ep=2), world_size, "cpu")
    ranks = mesh.group_ranks("ep")
    out["sub"] = _check_a2a(rank, [[2, 1], [0, 3]], mesh.ep_group, ranks)
    return out


def test_all_to_all_and_tp_collectives_world2():
    out = run_distributed(_world2, 2, timeout=60)
    assert [o["a2a"]["rows_out"] for o in out] == [4, 0]


def test_all_to_all_zero_rows_counts_and_subgroups_world4():
    out = run_distributed(_world4, 4, timeout=60)
    assert [o["a2a"]["rows_in"] for o in out] == [4, 3, 0, 5]
    assert [o["a2a"]["rows_out"] for o in out] == [3, 3, 0, 6]
    assert [o["a2a"]["record_count"] for o in out] == [2, 2, 2, 2]  # forward + backward
    assert [o["sub"]["rows_out"] for o in out] == [2, 4, 2, 4]
