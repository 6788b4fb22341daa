"""train.optimizer_impl: which torch AdamW implementation each engine builds, and that the
implementations take the same step (elementwise math, so equal to float rounding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_dist.config import ConfigError, TrainConfig, load_config
from moe_dist.train.optim import adamw_implementation, build_optimizer, fused_by_default


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.Linear(20, 3))


@pytest.mark.parametrize("impl,fused_default,want", [
    ("auto", True, {"fused": True}),
    ("auto", False, {"foreach": False}),
    ("fused", False, {"fused": True}),
    ("foreach", True, {"foreach": True}),
    ("for_loop", True, {"foreach": False}),
])
def test_adamw_keywords(impl, fused_default, want):
    assert adamw_implementation(impl, fused_default) == want


def test_auto_is_fused_on_cuda_without_fsdp_only():
    assert fused_by_default(torch.device("cuda", 0), fsdp=False)
    assert not fused_by_default(torch.device("cuda", 0), fsdp=True)
    assert not fused_by_default(torch.device("cpu"), fsdp=False)


def test_unknown_implementation_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        load_config(None, ["train.optimizer_impl=apex"])


def test_implementations_take_the_same_steps():
    """Three AdamW steps with weight decay on the two param groups, per implementation (CPU has
    all three kernels): the parameters agree to float rounding, and the built optimizer really
    is the requested one."""
    x, y = torch.randn(16, 12), torch.randn(16, 3)
    finals = {}
    for impl in ("for_loop", "foreach", "fused"):
        model = _model()
        opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1, optimizer_impl=impl))
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        assert bool(opt.defaults.get("foreach")) == (impl == "foreach")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in _model().parameters()])
    assert (finals["for_loop"] - start).abs().max() > 1e-3  # the steps moved the weights
    for impl in ("foreach", "fused"):
        torch.testing.assert_close(finals[impl], finals["for_loop"], rtol=1e-6, atol=1e-6)


def test_deepspeed_engine_takes_the_loop_only():
    from moe_dist.config import validate

    validate(load_config(None, ["train.engine=deepspeed", "zero.stage=1", "train.optimizer_impl=for_loop"]), 2)
    for impl in ("fused", "foreach"):
        with pytest.raises(ConfigError, match=rf"train.optimizer_impl \('{impl}'\) with train.engine=deepspeed.*"
                                              r"use train.optimizer_impl=auto"):
            validate(load_config(None, ["train.engine=deepspeed", "zero.stage=1", f"train.optimizer_impl={impl}"]), 2)


def test_a_resumed_run_may_change_the_implementation_not_the_state_dtype():
    from moe_dist.train.run_dir import config_differences

    old = load_config(None, []).to_dict()
    assert config_differences(old, load_config(None, ["train.optimizer_impl=fused"]).to_dict()) == []
    assert config_differences(old, load_config(None, ["train.optimizer_state_dtype=bf16"]).to_dict()) == [
        "train.optimizer_state_dtype"]
