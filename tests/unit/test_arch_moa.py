"""MoA: the single-head oracle, the mixture by hand, the losses by hand, parameter parity, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import ConfigError, ModelConfig, MoEConfig
from moe_dist.config.model import MoAConfig
from moe_dist.models.moa import MoAAttention, dense_attention_params, moa_attention_params
from moe_dist.models.registry import build
from moe_dist.models.transformer import Attention, apply_rotary, rotary_tables

DIM, SEQ = 16, 6


def _single_head(x, wq, wk, wv, wo, cos, sin):
    """Causal single-head attention with rotary q/k: x [B, S, D], w* [D, d_h], wo [d_h, D]."""
    q, k, v = ((x @ w).unsqueeze(1) for w in (wq, wk, wv))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1) @ wo


def test_all_experts_identical_and_selected_equal_single_head_attention():
    # k = E with identical experts: sum_e p_e * Attn(x W_q) W_o = Attn(x W_q) W_o (sum p = 1).
    torch.manual_seed(0)
    moa = MoAAttention(DIM, MoAConfig(num_experts=3, top_k=3, head_dim=8), 2)
    with torch.no_grad():
        moa.w_q.copy_(moa.w_q[:1].expand(3, -1, -1))
        moa.w_o.copy_(moa.w_o[:1].expand(3, -1, -1))
    cos, sin = rotary_tables(8, SEQ, 10000.0)
    x = torch.randn(2, SEQ, DIM)
    want = _single_head(x, moa.w_q[0], moa.wk.weight.t(), moa.wv.weight.t(), moa.w_o[0], cos, sin)
    got, _ = moa.eval()(x, cos, sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mixture_matches_a_token_by_token_loop():
    torch.manual_seed(1)
    moa = MoAAttention(DIM, MoAConfig(num_experts=4, top_k=2, head_dim=8), 2)
    cos, sin = rotary_tables(8, SEQ, 10000.0)
    x = torch.randn(1, SEQ, DIM)
    got, _ = moa.eval()(x, cos, sin)
    probs = torch.softmax(x[0] @ moa.router.t(), dim=-1)
    k = apply_rotary((x @ moa.wk.weight.t()).unsqueeze(1), cos, sin)[0, 0]  # [S, d_h]
    v = x[0] @ moa.wv.weight.t()
    for t in range(SEQ):
        top = torch.topk(probs[t], 2).indices
        want = torch.zeros(DIM)
        for e in top.tolist():
            q = (x[0, t] @ moa.w_q[e]).view(1, 1, 1, 8)
            q = apply_rotary(q, cos[t:t + 1], sin[t:t + 1]).view(8)
            attn = torch.softmax(k[:t + 1] @ q / math.sqrt(8), dim=0)
            want += probs[t, e] * (attn @ v[:t + 1]) @ moa.w_o[e]
        torch.testing.assert_close(got[0, t], want, rtol=1e-4, atol=1e-5)


def test_losses_by_hand():
    # One-hot tokens read the router's columns: logits (2, 0) and (1, 0); both pick expert 0.
    moa = MoAAttention(4, MoAConfig(num_experts=2, top_k=1, head_dim=2, aux_loss_coef=1.0, z_loss_coef=1.0), 2)
    with torch.no_grad():
        moa.router.copy_(torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    logits, probs, _, ids = moa.route(torch.eye(4)[:2])
    losses = moa.losses(logits, probs, ids)
    p0 = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(1.0))) / 2  # softmax of (a, 0)
    torch.testing.assert_close(losses["moa_aux_loss"], 2 * 1.0 * p0)  # E * (f_0=1) * P_0
    z = (math.log(math.exp(2) + 1) ** 2 + math.log(math.e + 1) ** 2) / 2
    torch.testing.assert_close(losses["moa_z_loss"], torch.tensor(z))


def test_uniform_router_losses_are_one_and_log_e_squared_with_the_default_weights():
    moa = MoAAttention(DIM, MoAConfig(num_experts=8, top_k=3, head_dim=4), 2)
    with torch.no_grad():
        moa.router.zero_()
    logits, probs, _, ids = moa.route(torch.randn(10, DIM))
    losses = moa.losses(logits, probs, ids)
    torch.testing.assert_close(losses["moa_aux_loss"], torch.tensor(0.01))
    torch.testing.assert_close(losses["moa_z_loss"], torch.tensor(0.001 * math.log(8) ** 2))


def test_losses_only_in_training_and_they_reach_the_router():
    torch.manual_seed(2)
    moa = MoAAttention(DIM, MoAConfig(num_experts=4, top_k=2, head_dim=8), 2)
    cos, sin = rotary_tables(8, SEQ, 10000.0)
    x = torch.randn(2, SEQ, DIM)
    assert moa.eval()(x, cos, sin)[1] == {}
    _, losses = moa.train()(x, cos, sin)
    assert set(losses) == {"moa_aux_loss", "moa_z_loss"}
    sum(losses.values()).backward()
    assert moa.router.grad.abs().sum() > 0


@pytest.mark.parametrize("dim, heads", [(16, 2), (32, 4), (128, 4), (64, 8)])
def test_default_sizes_match_dense_attention_parameters(dim, heads):
    moa = MoAAttention(dim, MoAConfig(), heads)
    assert (moa.num_experts, moa.top_k, moa.head_dim) == (2 * heads - 1, heads, dim // heads)
    router = dim * moa.num_experts
    count = sum(p.numel() for p in moa.parameters())
    assert count == moa_attention_params(dim, moa.num_experts, moa.head_dim)
    assert count - router == dense_attention_params(dim) == sum(p.numel() for p in Attention(dim, heads).parameters())


def test_flops_per_token_by_hand_and_attention_maps_match_dense():
    dim, heads, seq = 32, 4, 16
    moa = MoAAttention(dim, MoAConfig(), heads)  # E=7, k=4, d_h=8
    flops = moa.flops_per_token(seq)
    kv, q_o = 2 * 2 * dim * 8, 2 * 2 * 4 * dim * 8
    scores = 2 * 2 * 4 * 8 * (seq + 1) / 2
    assert flops == {"attention": kv + q_o + scores, "router": 2.0 * dim * 7}
    dense_scores = 2 * 2 * dim * (seq + 1) / 2  # k * d_h = dim: same attention-map FLOPs
    assert scores == dense_scores
    assert kv + q_o == 2 * 4 * dim * dim * (1 + 1 / heads) / 2  # 4d^2 (q, o) + 4d^2/H (k, v) < 8d^2


def test_model_flops_and_load_stats():
    model = build(ModelConfig(arch="moa", vocab_size=32, dim=DIM, n_layers=2, n_heads=2, max_seq_len=8),
                  MoEConfig(num_experts=4, every=2, expert_ffn_dim=8))
    parts = model.flops_per_token(8)
    moa = model.layers[0].attention.flops_per_token(8)
    assert parts.attention == pytest.approx(3 * 2 * moa["attention"])  # x3 for backward, 2 layers
    assert parts.router == pytest.approx(3 * (2 * moa["router"] + 2 * DIM * 4))  # + the MoE MLP's router
    model.train()(torch.randint(0, 32, (2, 8)))
    assert model.layers[0].attention.stats.routed.sum() == 2 * 8 * 2  # T * k, dense-MLP block
    assert model.layers[1].load_stats.num_experts == 3 + 4  # [attention experts | MLP experts]
    assert model.layers[1].load_stats.routed[:3].sum() == 2 * 8 * 2


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match="model.moa.top_k"):
        MoAConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="model.moa.top_k"):
        MoAAttention(DIM, MoAConfig(top_k=4), 2)  # derived E = 3 < 4
    with pytest.raises(ConfigError, match="even"):
        MoAConfig(head_dim=3)


def test_export_to_hugging_face_is_refused():
    from moe_dist.models.hf_format import export_target

    with pytest.raises(ConfigError, match="model.arch='moa'.*MoA"):
        export_target(ModelConfig(arch="moa", vocab_size=32), MoEConfig())
