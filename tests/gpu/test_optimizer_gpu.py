"""The bf16-moment AdamW on CUDA (train.optimizer_state_dtype=bf16): its Triton kernel equals
the torch arithmetic (both round to nearest), a step makes no host sync, and a short training
follows torch's fused AdamW to bf16 precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_dist.train import adamw_bf16_moments as bf16_adamw  # noqa: E402
from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments  # noqa: E402

DEVICE = torch.device("cuda")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 1000), nn.GELU(), nn.Linear(1000, 64)).to(DEVICE)


def _train(model, optimizer, steps: int) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for _ in range(steps):
        x = torch.randn(256, 512, device=DEVICE, generator=gen)
        y = torch.randn(256, 64, device=DEVICE, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_kernel_equals_the_torch_arithmetic(monkeypatch):
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(bf16_adamw, "use_kernel", lambda p, k=kernel: k)
        model = _model()
        opt = AdamWBf16Moments(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        _train(model, opt, steps=5)
        results.append(([p.detach().clone() for p in model.parameters()],
                        [opt.state[p]["exp_avg"].clone() for p in model.parameters()]))
    for got, want in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(results[0][1], results[1][1]):
        assert torch.equal(got, want)


def test_step_makes_no_host_sync():
    model = _model()
    opt = AdamWBf16Moments(model.parameters(), lr=1e-3)
    _train(model, opt, steps=1)  # state allocated, kernel compiled
    torch.cuda.synchronize()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_follows_fused_adamw():
    start = torch.cat([p.detach().flatten() for p in _model().parameters()])
    finals = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
                 lambda ps: AdamWBf16Moments(ps, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)):
        model = _model()
        _train(model, make(model.parameters()), steps=30)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (finals[0] - start).norm()
    assert moved > 0.1
    assert (finals[1] - finals[0]).norm() / moved < 0.02
