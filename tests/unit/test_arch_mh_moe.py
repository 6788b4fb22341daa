"""MH-MoE: parameter/FLOP parity with the plain MoE by counting, the h=1 identity oracle,
sub-token routing, shapes, gradients and bad configs."""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import ConfigError, MHMoEConfig, ModelConfig, MoEConfig, RouterConfig
from moe_dist.models.mh_moe import MHMoELayer, matched_sub_experts
from moe_dist.models.registry import build
from moe_dist.moe.layer import MoELayer


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("heads, sub_experts", [(2, 20), (3, 30)])
def test_params_and_flops_match_the_plain_moe_exactly(heads, sub_experts):
    # d=96, E=8, D=128, k=2: D' = 128 - 2*96/6 = 96 and E' = h*(8*128 - 64)/96 = 10h.
    moe = MoEConfig(num_experts=8, every=1, expert_ffn_dim=128, router=RouterConfig(top_k=2))
    plain = MoELayer(96, 256, moe)
    mh = MHMoELayer(96, 256, moe, MHMoEConfig(heads=heads))
    assert (mh.sub.num_experts, mh.sub.ffn_dim) == (sub_experts, 96)
    # Counting: head + merge + sub-token experts against the plain experts (routers apart).
    assert _numel(mh.head) + _numel(mh.merge) + _numel(mh.moe.experts) == _numel(plain.experts)
    model_cfg = ModelConfig(vocab_size=16, dim=96, n_layers=1, n_heads=4, max_seq_len=8)
    flops_plain = build_flops(model_cfg, moe, "transformer")
    flops_mh = build_flops(model_cfg, moe, "mh_moe", heads)
    assert flops_mh.dense + flops_mh.experts == flops_plain.experts
    assert mh.sub.param_ratio == 1.0 and mh.sub.flops_ratio == 1.0


def build_flops(model_cfg, moe, arch, heads=1):
    from moe_dist.metrics.flops import training_flops_per_token

    cfg = ModelConfig(**{**model_cfg.__dict__, "arch": arch, "mh_moe": MHMoEConfig(heads=heads)})
    model = build(cfg, moe) if arch != "transformer" else None
    return training_flops_per_token(cfg, moe, 8, model=model)


def test_rounded_parity_of_the_tiny_config_is_close():
    sub = matched_sub_experts(dim=128, num_experts=8, ffn_dim=192, top_k=2, heads=2)
    assert abs(sub.param_ratio - 1) < 0.015 and abs(sub.flops_ratio - 1) < 0.015, sub


def test_one_head_with_identity_projections_is_the_plain_moe():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=RouterConfig(top_k=2))
    plain = MoELayer(16, 32, moe)
    mh = MHMoELayer(16, 32, moe, MHMoEConfig(heads=1, match_moe=False))
    mh.moe.load_state_dict(plain.state_dict())
    with torch.no_grad():
        mh.head.weight.copy_(torch.eye(16))
        mh.merge.weight.copy_(torch.eye(16))
    x = torch.randn(2, 5, 16)
    got, got_losses = mh(x)
    want, want_losses = plain(x)
    torch.testing.assert_close(got, want)
    assert got_losses.keys() == want_losses.keys()
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name])


def test_sub_tokens_are_routed_separately():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=RouterConfig(top_k=1))
    mh = MHMoELayer(16, 32, moe, MHMoEConfig(heads=4, match_moe=False))
    x = torch.randn(1, 3, 16)
    out, _ = mh(x)
    # By hand: each of the 4 sub-tokens of a token goes through its own top-1 expert.
    sub = (x[0] @ mh.head.weight.t()).view(3, 4, 4)
    rows = []
    for t in range(3):
        pieces = []
        for h in range(4):
            one, _ = mh.moe(sub[t, h].view(1, 1, 4))
            pieces.append(one.view(4))
        rows.append(torch.cat(pieces) @ mh.merge.weight.t())
    torch.testing.assert_close(out[0], torch.stack(rows), rtol=1e-5, atol=1e-6)
    assert mh.moe.stats.tokens == 12 + 12  # 3 tokens x 4 heads, then the 12 single sub-tokens


def test_model_shapes_grads_and_stats():
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="mh_moe", vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=8,
                            mh_moe=MHMoEConfig(heads=2, num_experts=8))
    model = build(model_cfg, MoEConfig(num_experts=4, every=2, expert_ffn_dim=32))
    out = model(torch.randint(0, 32, (2, 8)))
    assert out.logits.shape == (2, 8, 32) and {"aux_loss", "z_loss"} <= out.losses.keys()
    (out.logits.logsumexp(-1).mean() + sum(out.losses.values())).backward()
    layer = model.layers[1].mlp
    assert layer.moe.num_experts == 8
    for p in (layer.head.weight, layer.merge.weight, layer.moe.router.weight, layer.moe.experts.w13):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.moe.stats.tokens == 2 * 8 * 2  # sub-tokens


def test_bad_head_count():
    with pytest.raises(ConfigError, match=r"model.dim \(30\) must be divisible by model.mh_moe.heads \(4\)"):
        MHMoELayer(30, 64, MoEConfig(num_experts=4), MHMoEConfig(heads=4))
    with pytest.raises(ConfigError, match="expert_ffn_dim"):
        MHMoELayer(64, 64, MoEConfig(num_experts=4, expert_ffn_dim=16), MHMoEConfig(heads=2))
