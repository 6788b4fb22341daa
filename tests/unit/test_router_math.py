"""Router math against hand-computed values."""

import math

import pytest
import torch

from moe_dist.config import RouterConfig
from moe_dist.moe.routing import balance
from moe_dist.moe.routing.top_k import TopKRouter


def _identity_router(num_experts, **cfg):
    """A router whose logits equal its input (weight = identity)."""
    router = TopKRouter(num_experts, num_experts, RouterConfig(**cfg))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def test_softmax_top2_selection_and_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                           [0.0, 0.0, 3.0, 1.0]])
    router = _identity_router(4, top_k=2, aux_loss_coef=0, z_loss_coef=0)
    x = logits
    result = router(x)
    assert result.indices.tolist() == [[0, 1], [2, 3]]
    p = torch.softmax(logits, -1)
    expected0 = torch.tensor([p[0, 0], p[0, 1]]) / (p[0, 0] + p[0, 1])
    torch.testing.assert_close(result.weights[0], expected0)
    # e/(e+1) and 1/(e+1): softmax of the two chosen logits
    torch.testing.assert_close(result.weights[1], torch.tensor([math.e ** 2 / (math.e ** 2 + 1), 1 / (math.e ** 2 + 1)]))
    assert result.tokens_per_expert.tolist() == [1, 1, 1, 1]


def test_top1_switch_weight_is_the_probability():
    router = TopKRouter(3, 3, RouterConfig(top_k=1, aux_loss_coef=0, z_loss_coef=0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    x = torch.tensor([[0.0, 1.0, 0.0]])
    result = router(x)
    assert result.indices.tolist() == [[1]]
    torch.testing.assert_close(result.weights, torch.tensor([[math.e / (math.e + 2)]]))


def test_switch_aux_loss_is_one_at_perfect_balance_and_hand_value():
    probs = torch.full((8, 4), 0.25)
    counts = torch.tensor([4, 4, 4, 4])  # 8 tokens x top-2 = 16 assignments
    assert balance.switch_aux_loss(probs, counts, top_k=2).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    counts = torch.tensor([2, 0])  # both tokens chose expert 0 (top-1)
    # E * sum f_i P_i = 2 * (1.0 * 0.65 + 0 * 0.35) = 1.3
    assert balance.switch_aux_loss(probs, counts, top_k=1).item() == pytest.approx(1.3)


def test_z_loss_zero_logits_64_experts():
    value = balance.z_loss(torch.zeros(5, 64))
    assert value.item() == pytest.approx(math.log(64) ** 2, rel=1e-6)  # 17.30
    assert (1e-3 * value).item() == pytest.approx(0.0173, abs=1e-4)


def test_router_losses_are_weighted_and_only_in_training():
    router = TopKRouter(8, 4, RouterConfig(top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001))
    x = torch.randn(16, 8)
    result = router(x)
    assert set(result.losses) == {"aux_loss", "z_loss"}
    logits = x @ router.weight.t()
    torch.testing.assert_close(result.losses["z_loss"], 0.001 * torch.logsumexp(logits, -1).square().mean())
    router.eval()
    assert router(x).losses == {}


def test_sequence_aux_loss_perfect_balance_equals_one():
    scores = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert balance.sequence_aux_loss(scores, indices, seq_len=2).item() == pytest.approx(1.0)


def test_loss_free_bias_update_and_selection_only():
    bias = torch.zeros(4)
    balance.update_selection_bias(bias, torch.tensor([10, 30, 20, 20]), rate=1e-3)
    torch.testing.assert_close(bias, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))

    router = TopKRouter(2, 2, RouterConfig(top_k=1, bias_update_rate=1e-3, aux_loss_coef=0, z_loss_coef=0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
        router.expert_bias.copy_(torch.tensor([0.0, 1.0]))  # pushes selection to expert 1
    result = router(torch.tensor([[1.0, 0.0]]))
    assert result.indices.tolist() == [[1]]
    # the gate value is the unbiased probability of expert 1
    torch.testing.assert_close(result.weights, torch.tensor([[1 / (1 + math.e)]]))


def test_sigmoid_router_normalises_selected_scores():
    router = TopKRouter(3, 3, RouterConfig(type="sigmoid_topk", top_k=2, aux_loss_coef=0, z_loss_coef=0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    result = router(torch.tensor([[1.0, 0.0, -1.0]]))
    s = torch.sigmoid(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(result.weights[0], s / s.sum())


# p1 = [.5, .3, .2] -> top-2 {0, 1}; p2 = [.1, .6, .3] -> top-2 {1, 2}; P = mean p = [.3, .45, .25].
TWO_TOKENS = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))


def test_aux_loss_counts_all_assignments_or_the_first_choice():
    assignments = _identity_router(3, top_k=2, aux_loss_coef=1.0, z_loss_coef=0)(TWO_TOKENS)
    # f = [1, 2, 1] / (T*K = 4): 3 * (.25*.3 + .5*.45 + .25*.25) = 1.0875 (Mixtral, Megatron-core)
    assert assignments.losses["aux_loss"].item() == pytest.approx(1.0875, rel=1e-6)
    top1 = _identity_router(3, top_k=2, aux_loss_coef=1.0, z_loss_coef=0, aux_loss_type="top1")(TWO_TOKENS)
    # first choices 0 and 1: f = [.5, .5, 0]: 3 * (.5*.3 + .5*.45) = 1.125 (Switch, GShard)
    assert top1.losses["aux_loss"].item() == pytest.approx(1.125, rel=1e-6)
    assert top1.indices.tolist() == assignments.indices.tolist()  # only the loss differs


def test_aux_loss_counts_the_unbiased_top_k_when_the_selection_is_biased():
    router = _identity_router(3, top_k=2, aux_loss_coef=1.0, seq_aux_loss_coef=1.0, z_loss_coef=0,
                              bias_update_rate=1e-3)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    result = router(TWO_TOKENS, seq_len=2)
    assert [sorted(row) for row in result.indices.tolist()] == [[0, 2], [1, 2]]  # the bias moved the selection
    assert result.losses["aux_loss"].item() == pytest.approx(1.0875, rel=1e-6)  # biased counting: 0.9375
    unbiased = _identity_router(3, top_k=2, aux_loss_coef=1.0, seq_aux_loss_coef=1.0, z_loss_coef=0)
    torch.testing.assert_close(result.losses["seq_aux_loss"], unbiased(TWO_TOKENS, seq_len=2).losses["seq_aux_loss"])


def test_top1_aux_loss_is_refused_for_variable_k_routers():
    from moe_dist.config import ConfigError

    with pytest.raises(ConfigError, match="aux_loss_type='top1'.*top_p"):
        RouterConfig(type="top_p", aux_loss_type="top1")


@pytest.mark.parametrize("kind", ["sigmoid_topk", "softmax_topk"])
def test_one_expert_per_token_keeps_the_router_gradient(kind):
    router = _identity_router(4, type=kind, top_k=1, aux_loss_coef=0, z_loss_coef=0)  # normalize_weights=True
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 1.0]])
    result = router(x)
    scores = torch.sigmoid(x) if kind == "sigmoid_topk" else torch.softmax(x, -1)
    torch.testing.assert_close(result.weights[:, 0], scores.max(-1).values)  # the gate value, not 1
    result.weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0.1
