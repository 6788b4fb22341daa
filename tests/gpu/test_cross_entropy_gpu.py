"""The fused token cross-entropy on CUDA against F.cross_entropy in fp32, at a real vocabulary
size (the block loop runs several steps), with bf16 logits, and without host syncs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_dist.models.cross_entropy import token_cross_entropy  # noqa: E402

DEVICE = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_fp32_reference(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(2, 300, 32768 + 5, device=DEVICE, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, logits.shape[-1], (2, 300), device=DEVICE, generator=gen)
    targets[0, :7] = -100
    x_ref = logits.clone().requires_grad_(True)
    want = F.cross_entropy(x_ref.float().flatten(0, 1), targets.flatten())
    want.backward()
    x = logits.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = token_cross_entropy(x, targets)
        got.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(),
                               **({"rtol": 1e-4, "atol": 1e-8} if dtype == torch.float32 else {}))
