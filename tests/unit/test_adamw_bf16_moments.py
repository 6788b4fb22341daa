"""train.optimizer_state_dtype=bf16: AdamW with bf16 moments against hand-computed steps, torch's
AdamW, its own Triton kernel (CPU interpreter), checkpoints, the config and the memory estimate."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first built

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moe_dist.config import ConfigError, TrainConfig, load_config, validate  # noqa: E402
from moe_dist.train import adamw_bf16_moments as bf16_adamw  # noqa: E402
from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments  # noqa: E402
from moe_dist.train.optim import build_optimizer  # noqa: E402

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randn(16, 3, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_first_two_steps_by_hand():
    """Step 1: m = (1-b1) g, v = (1-b2) g^2, so the bias-corrected update is g / (|g| + eps).
    Step 2 with gradient g2, written out; the moments are stored rounded to bf16."""
    param = nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))
    opt = AdamWBf16Moments([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    g1, g2 = torch.tensor([0.3, -0.7, 2e-3]), torch.tensor([-0.1, -0.4, 5e-3])
    param.grad = g1.clone()
    opt.step()
    p1 = torch.tensor([0.5, -2.0, 3.0]) * (1 - LR * WD) - LR * g1 / (g1.abs() + EPS)
    torch.testing.assert_close(param.detach(), p1, rtol=0, atol=1e-7)
    state = opt.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and state["step"] == 1
    m1, v1 = (1 - BETAS[0]) * g1, (1 - BETAS[1]) * g1 * g1
    assert torch.equal(state["exp_avg"], m1.bfloat16()) and torch.equal(state["exp_avg_sq"], v1.bfloat16())

    param.grad = g2.clone()
    opt.step()
    m2 = BETAS[0] * m1.bfloat16().float() + (1 - BETAS[0]) * g2
    v2 = BETAS[1] * v1.bfloat16().float() + (1 - BETAS[1]) * g2 * g2
    step_size = LR / (1 - BETAS[0] ** 2)
    p2 = p1 * (1 - LR * WD) - step_size * m2 / (v2.sqrt() / (1 - BETAS[1] ** 2) ** 0.5 + EPS)
    torch.testing.assert_close(param.detach(), p2, rtol=1e-6, atol=1e-7)


def test_follows_torch_adamw_to_bf16_precision():
    """Twenty steps on a small MLP: the same trajectory as torch's fp32-moment AdamW within what
    bf16 moments allow (0.4% relative rounding per stored moment), and far from no training."""
    start = torch.cat([p.detach().flatten() for p in _model().parameters()])
    finals = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)),
                       ("bf16", lambda ps: AdamWBf16Moments(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD))):
        model = _model()
        _train(model, make(model.parameters()), steps=20)
        finals[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (finals["torch"] - start).norm()
    assert moved > 0.1
    assert (finals["bf16"] - finals["torch"]).norm() / moved < 0.02


def test_triton_kernel_matches_the_torch_arithmetic(monkeypatch):
    """The CUDA kernel (interpreted on CPU) and the torch fallback take the same step from the
    same mid-training state (step 4, random moments), over tensors that are not a multiple of
    the block. The parameters agree to fp32 rounding. The stored moments agree to one bf16 ulp:
    the interpreter rounds fp32 to bf16 its own way, while the GPU kernel rounds to nearest like
    torch (tests/gpu checks that they are equal there)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(bf16_adamw, "_BLOCK", 64)
    gen = torch.Generator().manual_seed(4)
    shapes = [(40, 12), (40,), (3, 40)]
    params = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [torch.randn(shape, generator=gen) for shape in shapes]
    moments = [(torch.randn(shape, generator=gen).mul(0.1).bfloat16(),
                torch.rand(shape, generator=gen).mul(0.01).bfloat16()) for shape in shapes]
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(bf16_adamw, "use_kernel", lambda p, k=kernel: k)
        model = [nn.Parameter(p.clone()) for p in params]
        opt = AdamWBf16Moments(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        for param, grad, (avg, avg_sq) in zip(model, grads, moments):
            param.grad = grad.clone()
            opt.state[param] = {"step": torch.tensor(4.0), "exp_avg": avg.clone(), "exp_avg_sq": avg_sq.clone()}
        opt.step()
        results.append((model, [opt.state[p] for p in model]))
    (kernel_params, kernel_states), (torch_params, torch_states) = results
    for a, b, start in zip(kernel_params, torch_params, params):
        assert (a.detach() - start).abs().max() > 1e-3  # the step moved them
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(kernel_states, torch_states):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2 ** -7, atol=1e-30)


def test_built_from_the_config_with_the_trainers_groups():
    model = _model()
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=WD, optimizer_state_dtype="bf16"))
    assert isinstance(opt, AdamWBf16Moments)
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]  # matrices decay, biases do not
    assert type(build_optimizer(model, TrainConfig())) is torch.optim.AdamW


def test_state_dict_round_trip_and_loading_fp32_moments():
    """Its own state dict reloads (torch's loader casts the moments to the parameter dtype; the
    next step brings them back to bf16, values unchanged), and it continues exactly as the
    optimizer that wrote it. torch AdamW's state (fp32 moments) loads too, and training goes on."""
    model, twin = _model(), _model()
    opt = AdamWBf16Moments(model.parameters(), lr=LR, weight_decay=WD)
    _train(model, opt, steps=3)
    twin.load_state_dict(model.state_dict())
    fresh = AdamWBf16Moments(twin.parameters(), lr=LR, weight_decay=WD)
    fresh.load_state_dict(opt.state_dict())
    _train(model, opt, steps=2, seed=5)
    _train(twin, fresh, steps=2, seed=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert fresh.state[q]["exp_avg"].dtype == fresh.state[q]["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"]) and fresh.state[q]["step"] == 5

    reference = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    _train(model, reference, steps=2)
    converted = AdamWBf16Moments(model.parameters(), lr=LR, weight_decay=WD)
    converted.load_state_dict(reference.state_dict())
    _train(model, converted, steps=1)
    for p in model.parameters():
        assert converted.state[p]["step"] == 3 and converted.state[p]["exp_avg"].dtype == torch.bfloat16


def test_config_refusals_name_the_combination_and_the_fix():
    validate(load_config(None, ["train.optimizer_state_dtype=bf16"]), 1)
    validate(load_config(None, ["train.optimizer_state_dtype=bf16", "parallel.ep=2"]), 2)
    refusals = {
        ("train.engine=deepspeed", "zero.stage=1"): (2, r"with train.engine=deepspeed.*use train.engine=native"),
        ("parallel.fsdp=true",): (2, r"with parallel.fsdp=true.*use parallel.fsdp=false"),
        ("train.offload_optimizer=true",): (1, r"with train.offload_optimizer=true.*train.offload_optimizer=false"),
        ("train.optimizer_impl=fused",): (1, r"with train.optimizer_impl=fused.*use train.optimizer_impl=auto"),
    }
    for overrides, (world, message) in refusals.items():
        with pytest.raises(ConfigError, match=r"^train.optimizer_state_dtype=bf16 " + message):
            validate(load_config(None, ["train.optimizer_state_dtype=bf16", *overrides]), world)


def test_memory_estimate_counts_four_bytes_of_moments():
    from moe_dist.train.memory import estimate_memory

    small = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=64", "train.device=cpu"]
    fp32 = estimate_memory(load_config(None, small), world_size=1)
    bf16 = estimate_memory(load_config(None, [*small, "train.optimizer_state_dtype=bf16"]), world_size=1)
    assert fp32.optimizer == 8 * fp32.rank_params
    assert bf16.optimizer == 4 * bf16.rank_params


@pytest.mark.parametrize("kind", ["fused", "bf16_torch", "bf16_kernel"])
def test_clipping_inside_the_step_equals_clip_then_step(monkeypatch, kind):
    """``set_clip_scale`` + step (the gradients scaled inside the optimizer's kernel) against
    ``clip_grad_norm_`` + step, for torch's fused AdamW and both paths of the bf16-moment AdamW;
    the clip really bites (norm far above max_norm) over three steps."""
    from moe_dist.train.optim import clips_inside_step, set_clip_scale

    if kind == "bf16_kernel":
        pytest.importorskip("triton")
    monkeypatch.setattr(bf16_adamw, "use_kernel", lambda p: kind == "bf16_kernel")

    def make(params):
        if kind == "fused":
            return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
        return AdamWBf16Moments(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    finals, max_norm = [], 0.05
    for inside in (False, True):
        model = _model(6)
        opt = make(model.parameters())
        assert clips_inside_step(opt)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            x, y = torch.randn(16, 12, generator=gen), torch.randn(16, 3, generator=gen)
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).mul(100).backward()
            if inside:
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
                set_clip_scale(opt, norm, max_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            assert norm > 10 * max_norm
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # grad * coef and grad / (1 / coef) differ in the last bit; with bf16 moments that can move a
    # stored moment by one bf16 ulp now and then: lr x 2^-8 per step at most.
    atol = 1e-6 if kind == "fused" else 3 * LR * 2 ** -8
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=atol)


def test_clip_scale_is_one_over_torchs_coefficient_and_none_without_clipping():
    from moe_dist.train.optim import clips_inside_step, set_clip_scale

    opt = AdamWBf16Moments([nn.Parameter(torch.zeros(2))])
    set_clip_scale(opt, torch.tensor(3.0), 1.5)
    assert opt.grad_scale.item() == pytest.approx((3.0 + 1e-6) / 1.5)
    set_clip_scale(opt, torch.tensor(0.5), 1.5)
    assert opt.grad_scale.item() == 1.0  # below max_norm: no scaling
    set_clip_scale(opt, torch.tensor(3.0), float("inf"))
    assert opt.grad_scale is None
    assert not clips_inside_step(torch.optim.AdamW([nn.Parameter(torch.zeros(2))], foreach=False))
