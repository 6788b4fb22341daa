"""comms with group=None (degree 1): identity paths, argument checks; no processes."""

from __future__ import annotations

import pytest
import torch

from moe_dist.distributed import comms


def test_all_to_all_without_group_is_identity_with_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    record = comms.CollectiveRecord()
    y = comms.AllToAll.apply(x, [5], [5], None, record)
    assert y is not x and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, x)
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5, 3), 2.0))
    assert record.count == 0 and record.summary() == "no collective recorded"


def test_all_to_all_zero_rows_without_group():
    x = torch.zeros(0, 4, requires_grad=True)
    y = comms.all_to_all(x, [0], [0], None)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 4)


def test_all_to_all_without_group_rejects_unequal_splits():
    with pytest.raises(ValueError, match=r"input_splits \[3\], output_splits \[2\]"):
        comms.all_to_all(torch.zeros(3, 1), [2], [3], None)


def test_split_checks():
    with pytest.raises(ValueError, match="input has 3 rows, input_splits sum to 4"):
        comms.all_to_all_single(torch.empty(4, 1), torch.zeros(3, 1), [4], [4], None)
    with pytest.raises(ValueError, match=r"one split per rank of the group \(1\)"):
        comms.all_to_all_single(torch.empty(3, 1), torch.zeros(3, 1), [1, 2], [3], None)


def test_local_collectives_and_counts():
    t = torch.tensor([1.0, 2.0])
    assert comms.all_reduce(t, "sum", None) is t
    with pytest.raises(ValueError, match="op 'mean' is not one of"):
        comms.all_reduce(t, op="mean", group=None)
    out = comms.all_gather_into_tensor(torch.empty(2), t, None)
    torch.testing.assert_close(out, t)
    counts = torch.tensor([3, 0, 2], dtype=torch.int64)
    got = comms.exchange_counts(counts, None)
    torch.testing.assert_close(got, counts)
    assert got.data_ptr() != counts.data_ptr()
    with pytest.raises(ValueError, match="1-D"):
        comms.exchange_counts(counts.view(3, 1), None)


def test_tp_ops_without_group_are_identity():
    x = torch.randn(4, 2)
    for fn in (comms.all_reduce_forward, comms.all_reduce_backward):
        assert fn(x, None) is x
    for fn in (comms.gather_forward_split_backward, comms.gather_forward_reduce_scatter_backward,
               comms.split_forward_gather_backward, comms.reduce_scatter_forward_gather_backward):
        assert fn(x, 0, None) is x
    assert (comms.group_size(None), comms.group_rank(None)) == (1, 0)


def test_world_helpers_without_process_group():
    assert comms.world_group() is None
    comms.barrier(None)
    comms.destroy()  # nothing to destroy


def test_group_is_a_required_argument():
    with pytest.raises(TypeError):
        comms.all_reduce(torch.zeros(1), op="max")  # type: ignore[call-arg]
