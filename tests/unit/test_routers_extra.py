"""Variable-k and expert-choice routers against the hand-computed oracles of ALGORITHMS.md §12."""

import math

import pytest
import torch

from moe_dist.config import AdaptiveConfig, ConfigError, MoEConfig, RouterConfig
from moe_dist.moe.routing import balance, state
from moe_dist.moe.routing.factory import build_router
from moe_dist.moe.routing.top_any import TopAnyRouter
from moe_dist.moe.routing.softmax_gate import exclusive_cumsum
from moe_dist.moe.routing.variable_k import DAMoERouter, attention_importance, k_from_importance

NO_LOSSES = dict(aux_loss_coef=0.0, z_loss_coef=0.0)


def _prob_router(kind, probs, **cfg):
    """A router of type ``kind`` whose softmax equals ``probs`` for input ``log(probs)``."""
    num_experts = probs.shape[-1]
    router = build_router(num_experts, num_experts, RouterConfig(type=kind, **{**NO_LOSSES, **cfg}))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router, probs.log()


def _k(result):
    return result.valid.sum(-1).tolist()


def test_top_p_oracles():
    router, x = _prob_router("top_p", torch.tensor([[0.5, 0.3, 0.15, 0.05]]), top_k=4, top_p=0.4)
    result = router(x)
    assert _k(result) == [1]
    assert result.indices[0, 0].item() == 0
    # raw probability, not renormalised
    torch.testing.assert_close(result.weights[0], torch.tensor([0.5, 0.0, 0.0, 0.0]))

    router, x = _prob_router("top_p", torch.full((3, 16), 1 / 16), top_k=16, top_p=0.4)
    assert _k(router(x)) == [7, 7, 7]


def test_xmoe_oracles_and_cap():
    router, x = _prob_router("xmoe", torch.tensor([[0.5, 0.3, 0.15, 0.05]]), top_k=4, xmoe_threshold=0.9)
    result = router(x)
    assert _k(result) == [3]
    assert sorted(result.indices[0, :3].tolist()) == [0, 1, 2]
    torch.testing.assert_close(result.weights[0, :3].sum(), torch.tensor(0.95))
    assert result.tokens_per_expert.tolist() == [1, 1, 1, 0]

    router, x = _prob_router("xmoe", torch.full((2, 64), 1 / 64), top_k=64, xmoe_threshold=0.9)
    assert _k(router(x)) == [58, 58]
    # top_k caps the experts per token of a variable-k router
    router, x = _prob_router("xmoe", torch.full((2, 64), 1 / 64), top_k=8, xmoe_threshold=0.9)
    result = router(x)
    assert result.indices.shape == (2, 8) and _k(result) == [8, 8]
    assert result.tokens_per_expert.sum().item() == 16


def test_exclusive_cumsum_and_top1_always_kept():
    torch.testing.assert_close(exclusive_cumsum(torch.tensor([[0.5, 0.3, 0.2]])), torch.tensor([[0.0, 0.5, 0.8]]))
    router, x = _prob_router("top_p", torch.tensor([[0.9, 0.1]]), top_k=2, top_p=0.01)
    assert _k(router(x)) == [1]


def test_expert_choice_oracle():
    torch.manual_seed(0)
    router = build_router(6, 4, RouterConfig(type="expert_choice", expert_choice_capacity=2.0, **NO_LOSSES))
    result = router(torch.randn(8, 6))
    assert result.indices.shape == (8, 4)
    assert result.tokens_per_expert.tolist() == [4, 4, 4, 4]
    assert int(result.valid.sum()) == 16
    # each expert took its 4 highest-probability tokens
    for e in range(4):
        chosen = result.valid[:, e].nonzero().flatten()
        best = torch.topk(result.scores[:, e], 4).indices
        assert sorted(chosen.tolist()) == sorted(best.tolist())
    torch.testing.assert_close(result.weights, torch.where(result.valid, result.scores, 0.0))


def test_da_moe_k_from_importance_and_uniform_attention():
    assert k_from_importance(torch.tensor([0.1, 0.5, 1.0, 0.0]), 4).tolist() == [1, 2, 4, 1]
    # identical tokens -> uniform causal attention -> every token equally important -> K = Kmax
    x = torch.ones(2 * 5, 8)
    torch.testing.assert_close(attention_importance(x, seq_len=5), torch.ones(10))
    router = DAMoERouter(8, 4, RouterConfig(type="da_moe", top_k=3, **NO_LOSSES))
    result = router(x, seq_len=5)
    assert _k(result) == [3] * 10
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(10))


def test_da_moe_explicit_importance_sets_k():
    router, x = _prob_router("da_moe", torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3), top_k=4)
    result = router(x, importance_T=torch.tensor([0.2, 0.5, 1.0]))
    assert _k(result) == [1, 2, 4]
    assert result.indices[1, :2].tolist() == [0, 1]
    torch.testing.assert_close(result.weights[1, :2], torch.tensor([0.4, 0.3]) / 0.7)


def _top_any_equal_cos(num_experts, a, b, max_k=0, **cfg):
    """w_e = unit vector e in D = E+1; x = (a,...,a,b) has the same cosine with every expert."""
    router = TopAnyRouter(num_experts + 1, num_experts, RouterConfig(type="top_any", top_any_max_k=max_k,
                                                                    aux_loss_coef=0.0, **cfg))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts, num_experts + 1))
    x = torch.tensor([[a] * num_experts + [b]])
    return router, x


def test_top_any_zero_thresholds_equal_cosine():
    router, x = _top_any_equal_cos(4, 1.0, 0.5)  # cos > 0 -> every expert fires
    result = router(x)
    assert _k(result) == [4]
    torch.testing.assert_close(result.weights, torch.full((1, 4), 0.25))

    router, x = _top_any_equal_cos(4, -1.0, 0.5)  # cos < 0 -> none fires
    router.train()
    result = router(x)  # training: no expert, zero MoE output (DynMoE)
    assert _k(result) == [0] and result.weights.abs().sum() == 0
    assert router.k_hist.tolist() == [1, 0, 0, 0, 0]  # recorded as unrouted (K = 0)
    router.eval()
    result = router(x)  # evaluation: the closest active expert, weight 1
    assert _k(result) == [1] and result.weights[0, 0].item() == 1.0


def test_top_any_training_fallback_is_an_option_and_never_counts_for_pruning():
    router, x = _top_any_equal_cos(4, -1.0, 0.5, top_any_train_fallback=True,
                                   adaptive=AdaptiveConfig(enabled=True, record_steps=0))
    x = torch.tensor([[-1.0, -1.0, -1.0, -2.0, 0.5]])  # none fires; expert 3 is farthest, 0-2 tie
    router.train()
    result = router(x)
    assert _k(result) == [1] and result.weights[0, 0].item() == 1.0 and result.indices[0, 0].item() in (0, 1, 2)
    assert result.tokens_per_expert.sum() == 1  # dispatched
    assert router.record_counts.sum() == 0 and router.record_unrouted.item() == 1  # but not a routing


def test_top_any_efficiency_and_balance_losses_by_hand():
    router = TopAnyRouter(8, 4, RouterConfig(type="top_any", top_any_reg_coef=1.0, aux_loss_coef=1.0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 8))
    router.train()
    # token 0 fires experts 0, 1; token 1 fires expert 0; token 2 fires nothing
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0, 0, 0, 0], [1.0, -1.0, -1.0, -1.0, 0, 0, 0, 0],
                      [-1.0, -1.0, -1.0, -1.0, 0, 0, 0, 0]])
    losses = router(x).losses
    assert losses["efficiency_loss"].item() == pytest.approx(3 / 12)  # 3 activations of 3 x 4 pairs
    # routed tokens 0, 1: m = ([.5,.5,0,0] + [1,0,0,0]) / 2 = [.75,.25,0,0]; c = [1, .5, 0, 0]
    assert losses["aux_loss"].item() == pytest.approx(4 * (0.75 * 1 + 0.25 * 0.5))


def test_top_any_regularisers_and_straight_through_gradient():
    router = TopAnyRouter(8, 4, RouterConfig(type="top_any", top_k=4, top_any_reg_coef=1.0, aux_loss_coef=0.0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 8))
    router.train()
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0, 0, 0, 0]])  # fires experts 0 and 1 only
    result = router(x)
    assert result.losses["diversity_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert result.losses["simplicity_loss"].item() == pytest.approx(1.0)
    assert sorted(result.indices[0][result.valid[0]].tolist()) == [0, 1]
    (result.weights.sum()).backward()
    grad = router.threshold.grad
    assert grad[0] != 0 and grad[1] != 0 and grad[2] == 0 and grad[3] == 0


def test_top_any_cap_keeps_largest_margins():
    router, _ = _top_any_equal_cos(4, 1.0, 0.5, max_k=2)
    x = torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.0]])
    result = router(x)
    assert result.indices[0].tolist() == [2, 1] and _k(result) == [2]
    torch.testing.assert_close(result.weights, torch.full((1, 2), 0.5))


def test_inactive_slots_never_receive_tokens():
    router = TopAnyRouter(8, 4, RouterConfig(type="top_any", top_k=4))
    router.active.copy_(torch.tensor([True, False, True, False]))
    router.eval()  # the fallback gives every token an expert
    result = router(torch.randn(32, 8))
    assert result.tokens_per_expert[1] == 0 and result.tokens_per_expert[3] == 0
    assert int(result.valid.sum(-1).min()) >= 1


def test_loss_free_bias_on_a_variable_k_router():
    router, x = _prob_router("top_p", torch.tensor([[0.5, 0.3, 0.15, 0.05]]), top_k=4, top_p=0.4,
                             bias_update_rate=1e-3)
    router.train()
    router.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0]))  # orders expert 1 first
    result = router(x)
    # order 1, 0, ...: the cumulative sum runs over the unbiased p in that order: 0, 0.3, 0.8
    assert result.indices[0, :2].tolist() == [1, 0] and _k(result) == [2]
    torch.testing.assert_close(result.weights[0, :2], torch.tensor([0.3, 0.5]))  # unbiased gate values
    router.step_counts.copy_(torch.tensor([10.0, 30.0, 20.0, 20.0]))
    router.expert_bias.zero_()
    state.update_selection_bias_from_stats(router)
    torch.testing.assert_close(router.expert_bias, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))


def test_losses_seq_aux_perfect_balance_and_z_loss():
    alpha = 1e-4
    # 2 sequences of 2 tokens, each token picks 2 of 4 experts, every expert once per sequence
    router, x = _prob_router("top_p", torch.full((4, 4), 0.25), top_k=2, top_p=0.3,
                             seq_aux_loss_coef=alpha)
    router.train()
    result = router(x, seq_len=2)
    assert _k(result) == [2, 2, 2, 2]
    # P_i = 1/E for uniform scores, so sum_i f_i P_i = 1 whatever f: the weighted loss is alpha
    assert result.losses["seq_aux_loss"].item() == pytest.approx(alpha)
    scores = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    valid = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    assert balance.sequence_aux_loss(scores, balanced, 2).item() == pytest.approx(1.0)
    # with a mask the share is over valid assignments: still 1 for uniform scores
    assert balance.sequence_aux_loss(scores, balanced, 2, valid).item() == pytest.approx(1.0)

    router = build_router(8, 64, RouterConfig(type="xmoe", top_k=4, aux_loss_coef=0.0, z_loss_coef=1e-3))
    router.weight.data.zero_()
    router.train()
    z = router(torch.randn(5, 8)).losses["z_loss"]
    assert z.item() == pytest.approx(math.log(64) ** 2 * 1e-3, rel=1e-5)
    assert math.log(64) ** 2 == pytest.approx(17.30, abs=5e-3)


def test_variable_k_aux_loss_is_weighted_and_one_at_balance():
    router, x = _prob_router("xmoe", torch.full((4, 4), 0.25), top_k=4, xmoe_threshold=1.0, aux_loss_coef=0.01)
    router.train()
    result = router(x)
    assert _k(result) == [4] * 4
    assert result.losses["aux_loss"].item() == pytest.approx(0.01)


def test_bad_router_config_is_rejected():
    with pytest.raises(ConfigError, match="xmoe_threshold"):
        RouterConfig(type="xmoe", xmoe_threshold=1.5)
    with pytest.raises(ConfigError, match="top_p"):
        RouterConfig(type="top_p", top_p=0.0)
    with pytest.raises(ConfigError, match="expert_choice_capacity"):
        RouterConfig(type="expert_choice", expert_choice_capacity=0.0)
    with pytest.raises(ConfigError, match="bias_update_rate"):
        RouterConfig(type="top_any", bias_update_rate=1e-3)
    with pytest.raises(ConfigError, match="adaptive.enabled needs"):
        RouterConfig(type="top_p", adaptive=AdaptiveConfig(enabled=True))
    with pytest.raises(ConfigError, match="slot pool"):
        MoEConfig(num_experts=4, router=RouterConfig(type="top_any", adaptive=AdaptiveConfig(initial_experts=6)))
    cfg = RouterConfig(type="top_p")
    object.__setattr__(cfg, "type", "nope")
    with pytest.raises(ConfigError, match="expert_choice"):
        build_router(4, 4, cfg)


@pytest.mark.parametrize("kind", ["softmax_topk", "top_p", "da_moe"])
def test_loss_free_bias_moves_a_skewed_router_toward_balance(kind):
    torch.manual_seed(0)
    router = build_router(8, 4, RouterConfig(type=kind, top_k=2, top_p=0.3, bias_update_rate=1e-2, **NO_LOSSES))
    with torch.no_grad():
        router.weight.normal_(std=0.3)
        router.weight[0] += 0.4  # expert 0 is favoured by most tokens
    router.train()
    x = torch.randn(128, 8) + 1.0

    def max_violation():
        counts = router(x).tokens_per_expert.float()
        router.step_counts.zero_()
        return ((counts.max() - counts.mean()) / counts.mean()).item()

    before = max_violation()
    for _ in range(60):
        router(x)
        state.update_selection_bias_from_stats(router)
    after = max_violation()
    assert before > 0.5 and after < 0.5 * before, (before, after)
