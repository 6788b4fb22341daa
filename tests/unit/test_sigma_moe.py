"""SwitchAll's sigma-MoE (ALGORITHMS.md section 2) by hand: ReLU experts with raw sigmoid gates,
expert dropout (masked scores in training, none in eval), the entropy regulariser on the raw
logits, every MLP a sigma-MoE, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import ConfigError, ModelConfig, MoEConfig, RouterConfig, SwitchHeadConfig
from moe_dist.models.registry import build
from moe_dist.models.switchhead import SigmaMoELayer, neg_entropy_of_mean

D, G, E, K, T = 8, 6, 4, 2, 10


def _layer(entropy_reg: float = 0.0, dropout: float = 0.0) -> SigmaMoELayer:
    torch.manual_seed(0)
    layer = SigmaMoELayer(D, 32, MoEConfig(num_experts=E, expert_ffn_dim=G, router=RouterConfig(top_k=K)),
                          entropy_reg, dropout)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        layer.experts.w13.normal_(std=0.3)
        layer.experts.w2.normal_(std=0.3)
    return layer


def _by_hand(layer: SigmaMoELayer, x_TD: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{e in topK(s_t)} s_te * ReLU(x_t W1_e) W2_e, no renormalisation."""
    w1, w2 = layer.experts.w13, layer.experts.w2
    rows = []
    for t in range(x_TD.shape[0]):
        top = torch.topk(scores_TE[t], K).indices
        rows.append(sum(scores_TE[t, e] * (F.relu(x_TD[t] @ w1[e]) @ w2[e]) for e in top))
    return torch.stack(rows)


def test_relu_experts_hold_only_the_up_projection():
    layer = _layer()
    assert layer.experts.w13.shape == (E, D, G) and layer.experts.w2.shape == (E, G, D)
    assert layer.experts.fused_parts == 1 and layer.experts.activation == "relu"


def test_forward_matches_the_hand_computed_sigma_moe():
    layer = _layer().eval()
    x = torch.randn(2, T // 2, D)
    out, losses = layer(x)
    x_TD = x.reshape(-1, D)
    scores = torch.sigmoid(x_TD @ layer.router.weight.t())
    torch.testing.assert_close(out.reshape(-1, D), _by_hand(layer, x_TD, scores), rtol=1e-5, atol=1e-6)
    assert losses == {}  # eval: no regulariser


def test_expert_dropout_masks_scores_to_zero_before_top_k_in_training_only():
    layer = _layer(dropout=0.5)
    x_TD = torch.randn(T, D)
    scores = torch.sigmoid(x_TD @ layer.router.weight.t())
    layer.train()
    torch.manual_seed(5)
    routing = layer.route(x_TD, None)
    torch.manual_seed(5)
    masked = torch.where(torch.rand(T, E) >= 0.5, scores, 0.0)
    assert (masked == 0).any() and (masked > 0).any()
    top = torch.topk(masked, K, dim=-1).indices
    torch.testing.assert_close(routing.weights, masked.gather(1, top))  # the masked scores, not renormalised
    torch.testing.assert_close(routing.scores, masked)
    layer.eval()
    routing = layer.route(x_TD, None)
    torch.testing.assert_close(routing.weights, scores.gather(1, torch.topk(scores, K, dim=-1).indices))


def test_heavy_dropout_gives_zero_weights_not_nan():
    layer = _layer(dropout=0.95).train()
    out, _ = layer(torch.randn(1, 64, D))
    assert torch.isfinite(out).all()


def test_entropy_regulariser_uses_raw_logits_before_dropout():
    layer = _layer(entropy_reg=1e-3, dropout=0.5).train()
    x = torch.randn(2, 5, D)
    _, losses = layer(x)
    logits = x.reshape(-1, D) @ layer.router.weight.t()
    p_bar = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(losses["entropy_reg"], 1e-3 * (p_bar * p_bar.log()).sum())


def test_neg_entropy_in_log_space_survives_extreme_logits():
    logits = torch.tensor([[200.0, -200.0, 0.0], [-200.0, 200.0, 0.0]], requires_grad=True)
    value = neg_entropy_of_mean(logits)
    value.backward()
    assert value.item() == pytest.approx(-math.log(2), rel=1e-6) and torch.isfinite(logits.grad).all()


def _switch_all(every: int = 1, **switchhead) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(arch="switchhead", vocab_size=32, dim=32, n_layers=2, n_heads=4, max_seq_len=16,
                        switchhead=SwitchHeadConfig(n_heads=2, head_dim=12, num_experts=3, switch_all=True,
                                                    **switchhead))
    return model, MoEConfig(num_experts=4, every=every, expert_ffn_dim=16, router=RouterConfig(top_k=2))


def test_switch_all_makes_every_mlp_a_sigma_moe_and_needs_every_1():
    model = build(*_switch_all(expert_dropout=0.1))
    assert all(isinstance(block.mlp, SigmaMoELayer) for block in model.layers)
    assert all(block.mlp.expert_dropout == 0.1 and block.mlp.experts.activation == "relu" for block in model.layers)
    with pytest.raises(ConfigError, match=r"moe.every=1 \(got 2\)"):
        build(*_switch_all(every=2))
    with pytest.raises(ConfigError, match="expert_dropout"):
        SwitchHeadConfig(expert_dropout=1.0)


def test_switch_all_flops_count_relu_experts():
    model = build(*_switch_all())
    swiglu = build(*_switch_all(expert_activation="swiglu"))
    d, k, g, layers = 32, 2, 16, 2
    assert model.flops_per_token(16).experts == pytest.approx(3 * layers * k * 2 * 2 * d * g)
    assert swiglu.flops_per_token(16).experts == pytest.approx(3 * layers * k * 2 * 3 * d * g)


def test_relu_experts_split_over_etp_as_one_fused_part():
    """apply_ep's etp slicing takes ReLU experts' w13 as one part: the etp ranks' partial outputs
    (column block of the up projection, row block of w2) sum to the full experts' output."""
    from moe_dist.distributed.mesh import MeshLayout, ParallelMesh
    from moe_dist.distributed.param_tags import etp_blocks
    from moe_dist.models.expert_parallel import _shard_experts
    from moe_dist.moe.experts import GroupedExperts

    torch.manual_seed(0)
    full = GroupedExperts(E, D, G, activation="relu")
    x, counts = torch.randn(9, D), torch.tensor([3, 2, 0, 4])
    want = full(x, counts)
    total = torch.zeros_like(want)
    for rank in range(2):
        shard = GroupedExperts(E, D, G, activation="relu")
        shard.load_state_dict(full.state_dict())
        mesh = ParallelMesh(layout=MeshLayout(world_size=2, dp=2, tp=1, ep=1, etp=2), rank=rank)
        _shard_experts(shard, range(E), mesh)
        assert shard.w13.shape == (E, D, G // 2) and shard.ffn_dim == G // 2
        assert etp_blocks(G, 1, rank, 2) == [(rank * G // 2, G // 2)]
        torch.testing.assert_close(shard.w13, full.w13[:, :, rank * G // 2:(rank + 1) * G // 2])
        total += shard(x, counts)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
