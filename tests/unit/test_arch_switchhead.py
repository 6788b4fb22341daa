"""SwitchHead / SwitchAll: the dense-MHA oracle, expert mixing by hand, shapes, grads, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.config import ConfigError, ModelConfig, MoEConfig, SwitchHeadConfig
from moe_dist.models.registry import build
from moe_dist.models.switchhead import SigmaMoELayer, SwitchHeadAttention, neg_entropy_of_mean
from moe_dist.models.transformer import Attention, rotary_tables

DIM, HEADS, SEQ = 16, 2, 6


def _attention_pair(num_experts: int, top_k: int) -> tuple[SwitchHeadAttention, Attention]:
    torch.manual_seed(0)
    dense = Attention(DIM, HEADS)
    sh = SwitchHeadAttention(DIM, SwitchHeadConfig(n_heads=HEADS, num_experts=num_experts, top_k=top_k), HEADS)
    d_h = DIM // HEADS
    with torch.no_grad():
        sh.wq.weight.copy_(dense.wq.weight)
        sh.wk.weight.copy_(dense.wk.weight)
        sh.sel_v.zero_()
        sh.sel_o.zero_()
        for h in range(HEADS):
            wv_h = dense.wv.weight[h * d_h:(h + 1) * d_h].t()  # [D, d_h]
            wo_h = dense.wo.weight[:, h * d_h:(h + 1) * d_h].t()  # [d_h, D]
            for e in range(num_experts):
                sh.w_v[h * num_experts + e].copy_(wv_h)
                sh.w_o[h * num_experts + e].copy_(wo_h)
    return sh, dense


def test_zero_selectors_identical_experts_top2_equal_dense_mha():
    sh, dense = _attention_pair(num_experts=3, top_k=2)
    cos, sin = rotary_tables(DIM // HEADS, SEQ, 10000.0)
    x = torch.randn(2, SEQ, DIM)
    # sigmoid(0) * 2 experts = 1 on the value side and on the output side.
    torch.testing.assert_close(sh(x, cos, sin), dense(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_one_expert_is_dense_mha_times_gates():
    sh, dense = _attention_pair(num_experts=1, top_k=1)
    cos, sin = rotary_tables(DIM // HEADS, SEQ, 10000.0)
    x = torch.randn(1, SEQ, DIM)
    torch.testing.assert_close(sh(x, cos, sin), 0.25 * dense(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_value_mixture_matches_hand_computation():
    torch.manual_seed(1)
    sh = SwitchHeadAttention(DIM, SwitchHeadConfig(n_heads=HEADS, num_experts=4, top_k=2), HEADS)
    x = torch.randn(5, DIM)
    gates, ids = sh.select(x, sh.sel_v)
    got = sh._mix(x, HEADS * 2, ids, gates, sh.w_v).view(5, HEADS, -1)
    scores = torch.sigmoid(x @ sh.sel_v.t()).view(5, HEADS, 4)
    for t in range(5):
        for h in range(HEADS):
            top = torch.topk(scores[t, h], 2).indices
            want = sum(scores[t, h, e] * (x[t] @ sh.w_v[h * 4 + e]) for e in top)
            torch.testing.assert_close(got[t, h], want, rtol=1e-5, atol=1e-6)
    assert ids.min() >= 0 and ids.max() < HEADS * 4
    assert ((ids // 4) == torch.arange(HEADS).view(1, -1, 1)).all(), "expert ids must stay inside their head"


def _cfg(**switchhead) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(arch="switchhead", vocab_size=32, dim=32, n_layers=2, n_heads=4, max_seq_len=16,
                        switchhead=SwitchHeadConfig(**switchhead))
    return model, MoEConfig(num_experts=4, every=1, expert_ffn_dim=16)


@pytest.mark.parametrize("switch_all", [False, True])
def test_model_shapes_grads_losses_and_stats(switch_all):
    torch.manual_seed(0)
    model = build(*_cfg(n_heads=2, head_dim=12, num_experts=3, top_k=2, switch_all=switch_all))
    tokens = torch.randint(0, 32, (2, 16))
    out = model(tokens)
    assert out.logits.shape == (2, 16, 32)
    assert ("entropy_reg" in out.losses) == switch_all
    assert ("aux_loss" in out.losses) != switch_all  # sigma-MoE has no Switch loss
    loss = out.logits.logsumexp(-1).mean() + sum(out.losses.values())
    loss.backward()
    attn = model.layers[0].attention
    for p in (attn.sel_v, attn.sel_o, attn.w_v, attn.w_o, attn.wq.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # One block-wide stats module: 2 sides x 32 tokens x 2 heads x top-2, then the MLP's top-2.
    stats = model.layers[0].load_stats
    assert stats.kept[:12].sum() == 2 * 32 * 2 * 2 and stats.kept[12:].sum() == 32 * 2  # 2*H*E = 12
    assert stats.tokens == 32
    from moe_dist.metrics.expert_load import ExpertLoadTracker

    report = ExpertLoadTracker.from_model(model).collect()
    assert [layer.layer_id for layer in report.layers] == [0, 1]
    assert report.layers[0].realized_k == 2 * 2 * 2 + 2
    assert model.rope_cos.shape == (16, 6)
    if switch_all:
        assert isinstance(model.layers[1].mlp, SigmaMoELayer)


def test_flops_count_by_hand():
    model = build(*_cfg(n_heads=2, head_dim=12, num_experts=3, top_k=2))
    got = model.flops_per_token(16)
    d, h, dh, e, k = 32, 2, 12, 3, 2
    attention = 2 * 2 * d * h * dh + 2 * 2 * h * k * d * dh + 2 * 2 * h * dh * 17 / 2
    router = 2 * 2 * d * h * e + 2 * d * 4  # attention gates + MoE MLP router
    assert got.attention == pytest.approx(3 * 2 * attention)
    assert got.router == pytest.approx(3 * 2 * router)
    assert got.experts == pytest.approx(3 * 2 * 2 * (2 * 3 * d * 16))
    assert got.head == 3 * 2 * d * 32


def test_entropy_regulariser_uniform_value():
    assert neg_entropy_of_mean(torch.zeros(7, 32)).item() == pytest.approx(-math.log(32), rel=1e-6)


def test_bad_head_count_is_a_config_error():
    with pytest.raises(ConfigError, match="model.switchhead.n_heads"):
        build(*_cfg(n_heads=5))
    with pytest.raises(ConfigError, match="top_k"):
        SwitchHeadConfig(num_experts=2, top_k=3)
