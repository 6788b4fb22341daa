"""The fused token cross-entropy against ``F.cross_entropy`` in fp32, on CPU through
TRITON_INTERPRET=1 (tiny shapes, a vocabulary that is not a multiple of the block)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from moe_dist.models.cross_entropy import fused_cross_entropy, token_cross_entropy  # noqa: E402


def _reference(logits, targets):
    x = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(x.float().flatten(0, -2), targets.flatten())
    loss.backward()
    return loss.detach(), x.grad


def _fused(logits, targets, block):
    x = logits.detach().clone().requires_grad_(True)
    loss = fused_cross_entropy(x, targets, block=block)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("block", [16, 64])  # 3 loop steps with a ragged last one / one step
def test_fused_matches_fp32_reference(block):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 37, generator=gen) * 4
    targets = torch.randint(0, 37, (2, 5), generator=gen)
    targets[0, 0], targets[1, 4] = 0, 36  # first and last vocabulary entries
    want_loss, want_grad = _reference(logits, targets)
    got_loss, got_grad = _fused(logits, targets, block)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_ignore_index_rows_have_no_loss_and_no_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=gen)
    targets = torch.tensor([3, -100, 19, -100, 0, 7])
    want_loss, want_grad = _reference(logits, targets)
    got_loss, got_grad = _fused(logits, targets, 16)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(got_grad[1], torch.zeros(20)) and torch.equal(got_grad[3], torch.zeros(20))


def test_bf16_logits_fp32_math_and_bf16_gradient():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 50, generator=gen) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 50, (4,), generator=gen)
    want_loss, want_grad = _reference(logits, targets)  # fp32 math on the bf16 values
    got_loss, got_grad = _fused(logits, targets, 16)
    assert got_loss.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad)  # both rounded from fp32 to bf16


def test_large_logits_do_not_overflow():
    logits = torch.tensor([[1000.0, 999.0, -1000.0], [-5e3, -5e3 + 1, -5e3 + 2]])
    targets = torch.tensor([1, 0])
    want_loss, want_grad = _reference(logits, targets)
    got_loss, got_grad = _fused(logits, targets, 16)
    assert torch.isfinite(got_loss)
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad, want_grad)


def test_cpu_entry_point_is_exactly_f_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 4), generator=gen)
    assert torch.equal(token_cross_entropy(logits, targets),
                       F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"logits \[2, 5\] and targets \[3\]"):
        fused_cross_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
