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
    """One step from the same mid-training state (step 4, random moments) through the kernel and
    through the torch ops. The fp32 arithmetic may differ in the last bit (FMA contraction), so
    a stored moment may land on the neighbouring bf16 value now and then: nearly all moments are
    identical, every one within one bf16 ulp, and the parameters agree to fp32 rounding."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    shapes = [(1000, 512), (1000,), (64, 1000), (333,)]
    params = [torch.randn(shape, device=DEVICE, generator=gen) for shape in shapes]
    grads = [torch.randn(shape, device=DEVICE, generator=gen) for shape in shapes]
    moments = [(torch.randn(shape, device=DEVICE, generator=gen).mul(0.1).bfloat16(),
                torch.rand(shape, device=DEVICE, generator=gen).mul(0.01).bfloat16()) for shape in shapes]
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(bf16_adamw, "use_kernel", lambda p, k=kernel: k)
        model = [nn.Parameter(p.clone()) for p in params]
        opt = AdamWBf16Moments(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        for param, grad, (avg, avg_sq) in zip(model, grads, moments):
            param.grad = grad.clone()
            opt.state[param] = {"step": torch.tensor(4.0), "exp_avg": avg.clone(), "exp_avg_sq": avg_sq.clone()}
        opt.step()
        results.append((model, [opt.state[p] for p in model]))
    (kernel_params, kernel_states), (torch_params, torch_states) = results
    for a, b in zip(kernel_params, torch_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(kernel_states, torch_states):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2 ** -7, atol=1e-30)
            assert (a[key] == b[key]).float().mean() > 0.999


@pytest.mark.parametrize("clip", [False, True])
def test_step_makes_no_host_sync(clip):
    from moe_dist.train.optim import set_clip_scale

    model = _model()
    opt = AdamWBf16Moments(model.parameters(), lr=1e-3)
    _train(model, opt, steps=1)  # state allocated, kernel compiled
    torch.cuda.synchronize()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if clip:  # the clip coefficient stays on the device
        set_clip_scale(opt, torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]), 1.0)
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


@pytest.mark.parametrize("fused_torch", [True, False])
def test_clipping_inside_the_step_equals_clip_then_step(fused_torch):
    """The trainer's clipping through ``optimizer.grad_scale`` (train/engines/native.py) against
    clip_grad_norm_ then step, on CUDA, for torch's fused AdamW and the bf16-moment AdamW."""
    from moe_dist.train.optim import set_clip_scale

    finals = []
    for inside in (False, True):
        model = _model(3)
        params = list(model.parameters())
        opt = (torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True) if fused_torch
               else AdamWBf16Moments(params, lr=1e-3, weight_decay=0.1))
        gen = torch.Generator(device=DEVICE).manual_seed(4)
        for _ in range(3):
            x = torch.randn(256, 512, device=DEVICE, generator=gen)
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().mul(100).backward()
            if inside:
                set_clip_scale(opt, torch.nn.utils.get_total_norm([p.grad for p in params]), 0.1)
            else:
                torch.nn.utils.clip_grad_norm_(params, 0.1)
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in params]))
    # grad * coef and grad / (1 / coef) differ in the last bit; with bf16 moments that can move a
    # stored moment by one bf16 ulp now and then: lr x 2^-8 per step at most.
    atol = 1e-6 if fused_torch else 3 * 1e-3 * 2 ** -8
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=atol)
