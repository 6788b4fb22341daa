"""Padding rows of an expert-sorted buffer (invalid or dropped assignments) get exactly zero
output and zero input gradient on every expert backend.

torch._grouped_mm leaves rows past the last offset undefined in both its output and its input
gradient; an unmasked gradient leaked uninitialised memory into the token gradients whenever a
capacity limit dropped assignments (the single-process reference was then non-deterministic).
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.moe.experts import grouped_matmul


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_padding_rows_zero_output_and_grad(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    counts = torch.tensor([3, 2])  # rows 5..9 are padding
    out = grouped_matmul(x, w, counts, backend)
    out.backward(torch.ones_like(out))
    assert torch.equal(out[5:], torch.zeros(5, 16))
    assert torch.equal(x.grad[5:], torch.zeros(5, 8))
    expected = torch.cat([x[:3] @ w[0], x[3:5] @ w[1]])
    torch.testing.assert_close(out[:5], expected)
