"""HMoE (models/hmoe.py): losses against hand-computed values, the three GEMM modes against a
hand loop, width placement, FLOPs and the model."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from moe_dist.config.model import HMoEConfig
from moe_dist.models.hmoe import HMoELayer, hmoe_losses, imbalance, place_experts, resolve_widths
from moe_dist.models.registry import build


def test_losses_oracle():
    # T=2 tokens, E=2 experts, K=1. probs rows [0.75, 0.25], [0.5, 0.5]; both tokens pick expert 0.
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    idx = torch.tensor([[0], [0]])
    widths = torch.tensor([8, 24])  # mean 16 -> sizes 0.5, 1.5
    out = hmoe_losses(probs, idx, widths)
    # f = [1, 0], P = [0.625, 0.375]
    assert out["balance"].item() == pytest.approx(2 * 0.625)
    assert out["p_penalty"].item() == pytest.approx(2 * 0.5 * 0.625)
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert out["entropy"].item() == pytest.approx((h1 + math.log(2)) / 2)


def test_p_penalty_prefers_small_experts_and_equals_switch_for_equal_widths():
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    to_small = hmoe_losses(probs, torch.tensor([[0], [0]]), torch.tensor([8, 24]))["p_penalty"]
    probs_big = torch.tensor([[0.4, 0.6], [0.4, 0.6]])
    to_big = hmoe_losses(probs_big, torch.tensor([[1], [1]]), torch.tensor([8, 24]))["p_penalty"]
    assert to_small.item() == pytest.approx(2 * 0.5 * 0.6) and to_big.item() == pytest.approx(2 * 1.5 * 0.6)
    same = hmoe_losses(probs, torch.tensor([[0], [1]]), torch.tensor([16, 16]))
    torch.testing.assert_close(same["p_penalty"], same["balance"])


def test_geometric_schedule_and_width_errors():
    assert resolve_widths(HMoEConfig(ratio=2.0), 4, 60) == [16, 32, 64, 128]
    assert resolve_widths(HMoEConfig(ratio=1.0), 3, 24) == [24, 24, 24]
    with pytest.raises(ConfigError, match="model.hmoe.widths has 2 entries"):
        resolve_widths(HMoEConfig(widths=[8, 16]), 4, 16)


def test_placement_balances_width_not_count():
    widths = [16, 32, 64, 128]
    assert place_experts(widths, 2) == [[3], [0, 1, 2]]
    assert imbalance(widths, [[0, 1], [2, 3]]) == pytest.approx(192 / 120)
    assert imbalance(widths, place_experts(widths, 2)) == pytest.approx(128 / 120)
    eight = [8, 8, 16, 16, 32, 32, 64, 64]
    placed = place_experts(eight, 4)
    assert sorted(e for r in placed for e in r) == list(range(8)) and all(placed)
    # loads 64, 64, 56, 56: the max equals the largest expert, a lower bound, so it is optimal
    assert imbalance(eight, placed) == pytest.approx(64 / 60)
    assert max(len(r) for r in placed) == 3 and min(len(r) for r in placed) == 1  # counts are not balanced
    assert all(place_experts([1, 1, 1, 100], 4))  # every rank gets one expert
    with pytest.raises(ValueError, match="cannot place 2 experts on 4"):
        place_experts([8, 8], 4)


def _layer(gemm: str) -> HMoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, expert_ffn_dim=16, router=RouterConfig(top_k=2))
    layer = HMoELayer(8, moe, HMoEConfig(widths=[8, 16, 16, 24], gemm=gemm), 16)
    layer.reset_arch_parameters(0.2, 0.2)
    return layer


@pytest.mark.parametrize("gemm", ["by_width", "padded", "per_expert"])
def test_layer_matches_hand_loop(gemm):
    layer = _layer(gemm)
    x = torch.randn(2, 5, 8)
    out, _ = layer(x)
    xt = x.reshape(-1, 8)
    probs = torch.softmax(xt @ layer.router.weight.T, -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for k in range(2):
            ex = layer.experts[str(idx[t, k].item())]
            g, u = (xt[t] @ ex.w13).chunk(2)
            want[t] += w[t, k] * ((F.silu(g) * u) @ ex.w2)
    torch.testing.assert_close(out.reshape(-1, 8), want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_model_losses_flops_and_errors():
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="hmoe", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                            hmoe=HMoEConfig(widths=[8, 16, 24, 32], balance_coef=0.01, entropy_coef=0.001))
    model = build(model_cfg, MoEConfig(num_experts=4, every=1, expert_ffn_dim=20, router=RouterConfig(top_k=2)))
    d, V, E = 16, 32, 4
    before = model.flops_per_token(8)
    per_layer_fwd = 2 * d * E + 6 * d * (2 * 20)  # nominal: top_k * mean width = 40
    attn = 2 * 4 * d * d + 2 * 2 * d * 9 / 2
    assert before.experts + before.router == pytest.approx(3 * 2 * per_layer_fwd)
    assert before.attention == pytest.approx(3 * 2 * attn) and before.head == pytest.approx(3 * 2 * d * V)
    model.train()
    out = model(torch.randint(0, 32, (2, 8)))
    assert {"hmoe_p_penalty", "hmoe_balance", "hmoe_entropy"} <= set(out.losses)
    out.logits.sum().backward()
    layer = model.layers[0].mlp
    assert layer.active_width() == pytest.approx(float(layer.width_seen) / 16)
    assert model.flops_per_token(8).experts == pytest.approx(
        3 * sum(6 * d * b.mlp.active_width() for b in model.layers))
    with pytest.raises(ConfigError, match="no shared experts"):
        build(model_cfg, MoEConfig(num_experts=4, num_shared_experts=1))


def test_export_to_transformers_is_refused():
    from moe_dist.models.hf_format import export_target

    with pytest.raises(ConfigError, match="model.arch='hmoe'.*different widths"):
        export_target(ModelConfig(arch="hmoe", vocab_size=32), MoEConfig(num_experts=4))


def test_memory_estimate_counts_the_busiest_rank_of_the_width_placement():
    from moe_dist.config import load_config
    from moe_dist.train.memory import estimate_memory

    common = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "moe.every=1", "moe.num_experts=4",
              "moe.expert_ffn_dim=16", "parallel.ep=2"]
    homogeneous = estimate_memory(load_config(None, common), 2)
    est = estimate_memory(load_config(None, [*common, "model.arch=hmoe", "model.hmoe.widths=[8,8,8,40]"]), 2)
    # mean width 16: the same parameters, and the same active ones at uniform top-2 routing
    assert est.total_params == homogeneous.total_params and est.active_params == homogeneous.active_params
    # placement [[3], [0, 1, 2]]: the busiest rank holds width 40, not 2 x 16 = 32 (3 * D params per width)
    assert est.rank_params - homogeneous.rank_params == 3 * 16 * (40 - 32)


def test_deepspeed_with_width_placed_experts_is_refused():
    from moe_dist.config import load_config, validate

    cfg = load_config(None, ["model.arch=hmoe", "train.engine=deepspeed", "parallel.ep=2", "zero.stage=1"])
    with pytest.raises(ConfigError, match=r"model.arch=hmoe is not supported.*train.engine=native"):
        validate(cfg, 2)


def test_ranks_holding_different_experts_have_one_model_signature():
    from moe_dist.distributed.agreement import model_signature
    from moe_dist.distributed.param_tags import mark_whole_expert

    def placed(drop: set[str]):
        cfg = ModelConfig(arch="hmoe", vocab_size=32, dim=16, n_layers=1, n_heads=2,
                          hmoe=HMoEConfig(widths=[8, 16, 24, 32]))
        model = build(cfg, MoEConfig(num_experts=4, every=1))
        layer = model.layers[0].mlp
        for e in drop:
            del layer.experts[e]
        for p in layer.experts.parameters():
            mark_whole_expert(p)
        return model_signature(model)

    assert placed({"3"}) == placed({"0", "1", "2"}) == placed(set())
    # Whole experts enter by name only (their widths differ per rank by design); a differing
    # model.hmoe.widths is caught by the config hash that run_digest compares beside the signature.
