"""DynMoE expert growth and pruning inside a slot pool (moe_dist.moe.routing.adaptive)."""

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import AdaptiveConfig, MoEConfig, RouterConfig
from moe_dist.moe.routing import adaptive
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.routing.state import routing_metrics

DIM = 6


def _layer(**adaptive_cfg):
    torch.manual_seed(0)
    defaults = dict(enabled=True, initial_experts=2, update_every=2, record_steps=0, prune_after=1)
    router = RouterConfig(type="top_any", top_k=4, aux_loss_coef=0.0,
                          adaptive=AdaptiveConfig(**{**defaults, **adaptive_cfg}))
    layer = MoELayer(DIM, 8, MoEConfig(num_experts=4, router=router))
    with torch.no_grad():  # slot e looks along unit vector e
        layer.router.weight.copy_(torch.eye(4, DIM))
    return layer


def _unit(*coords):
    x = torch.zeros(DIM)
    for i, v in coords:
        x[i] = v
    return x


TO_0 = _unit((0, 1.0))
TO_1 = _unit((1, 1.0))
NOWHERE = _unit((0, -1.0), (1, -1.0), (4, 2.0))  # negative cosine with slots 0 and 1


def _step(layer, *tokens, reduce_fn=None):
    layer.train()
    layer(torch.stack(tokens).view(1, len(tokens), DIM))
    return adaptive.update_adaptive_experts(layer, reduce_fn)


def test_unrouted_tokens_grow_the_first_free_slot_with_their_mean_direction():
    layer = _layer()
    router = layer.router
    assert router.active.tolist() == [True, True, False, False]
    other = _unit((1, -1.0), (0, -0.5), (5, 1.0))
    assert _step(layer, TO_0, TO_1, NOWHERE) == {}  # step 1 of 2: record only
    assert _step(layer, TO_0, TO_1, other) == {0: [2]}
    assert router.active.tolist() == [True, True, True, False]
    expected = F.normalize(NOWHERE + other, dim=0)
    torch.testing.assert_close(router.weight[2].detach(), expected)
    assert router.threshold[2].item() == 0.0
    assert router.pending_resets == [2]
    assert router.record_unrouted.item() == 0 and router.record_counts.sum().item() == 0
    # the new expert now takes the tokens that had no expert
    result = router(NOWHERE.view(1, DIM))
    assert result.indices[0, 0].item() == 2 and result.valid[0].sum().item() >= 1


def test_idle_experts_are_pruned_after_the_window_but_never_the_last():
    layer = _layer(prune_after=2, initial_experts=3)
    router = layer.router
    _step(layer, TO_0, TO_1)
    assert _step(layer, TO_0, TO_1) == {0: []}  # slot 2 idle for one window: kept
    assert router.idle_windows.tolist() == [0, 0, 1, 0]
    _step(layer, TO_0, TO_1)
    assert _step(layer, TO_0, TO_1) == {0: [2]}
    assert router.active.tolist() == [True, True, False, False]

    lonely = _layer(initial_experts=1)
    lonely(torch.zeros(1, 0, DIM))  # no tokens at all
    adaptive.update_adaptive_experts(lonely)
    adaptive.update_adaptive_experts(lonely)
    assert lonely.router.active.tolist() == [True, False, False, False]


def test_max_experts_caps_growth():
    layer = _layer(max_experts=2)
    _step(layer, TO_0, TO_1, NOWHERE)
    _step(layer, TO_0, TO_1, NOWHERE)
    assert layer.router.active.tolist() == [True, True, False, False]


def test_record_phase_follows_the_schedule():
    layer = _layer(update_every=3, record_steps=1)
    router = layer.router
    _step(layer, TO_0)  # step index 0: not recorded
    _step(layer, TO_0)  # step index 1: not recorded
    assert router.record_counts.sum().item() == 0
    layer.train()
    layer(TO_0.view(1, 1, DIM))  # step index 2: recorded
    assert router.record_counts.tolist() == [1, 0, 0, 0]


def test_decisions_come_from_the_reduced_records():
    layer = _layer()
    calls = []

    def another_rank_saw_unrouted(flat):
        calls.append(flat.numel())
        other = torch.zeros_like(flat)
        other[:4] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # counts
        other[4 + 4] = 3.0  # unrouted sum, coordinate 4
        other[-1] = 1.0  # one unrouted token
        return flat + other

    _step(layer, TO_0, TO_1, reduce_fn=another_rank_saw_unrouted)
    changes = _step(layer, TO_0, TO_1, reduce_fn=another_rank_saw_unrouted)
    assert calls == [4 + DIM + 1]  # one reduction, at the decision step only
    assert changes == {0: [2]}  # this rank had no unrouted token, the group had one
    torch.testing.assert_close(layer.router.weight[2].detach(), _unit((4, 1.0)))


def test_reset_slot_optimizer_state_zeroes_only_that_slot():
    layer = _layer(initial_experts=4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer.train()
    out, losses = layer(torch.randn(1, 16, DIM))
    (out.square().sum() + sum(losses.values())).backward()
    for param in layer.parameters():
        param.grad = torch.ones_like(param)  # every row has moments
    optimizer.step()
    adaptive.reset_slot_optimizer_state(optimizer, layer, 1)
    for param, rows in ((layer.router.weight, 4), (layer.router.threshold, 4),
                        (layer.experts.w13, 4), (layer.experts.w2, 4)):
        state = optimizer.state[param]
        for name in ("exp_avg", "exp_avg_sq"):
            norms = [state[name][r].abs().sum().item() for r in range(rows)]
            assert norms[1] == 0 and all(n > 0 for i, n in enumerate(norms) if i != 1), (name, norms)


def test_reset_maps_the_slot_to_the_local_expert_shard():
    layer = _layer(initial_experts=4)
    experts = layer.experts  # pretend ep=2, this rank holds slots 2 and 3
    experts.w13 = torch.nn.Parameter(experts.w13[2:].detach().clone())
    experts.w2 = torch.nn.Parameter(experts.w2[2:].detach().clone())
    experts.num_experts, experts.expert_offset = 2, 2
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for param in layer.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    adaptive.reset_slot_optimizer_state(optimizer, layer, 3)
    assert optimizer.state[experts.w13]["exp_avg"][1].abs().sum() == 0
    assert optimizer.state[experts.w13]["exp_avg"][0].abs().sum() > 0
    adaptive.reset_slot_optimizer_state(optimizer, layer, 0)  # not held here: experts untouched
    assert optimizer.state[experts.w13]["exp_avg"][0].abs().sum() > 0
    assert optimizer.state[layer.router.weight]["exp_avg"][0].abs().sum() == 0


def test_active_set_and_records_survive_a_checkpoint_round_trip():
    layer = _layer(update_every=3)
    _step(layer, TO_0, TO_1, NOWHERE)
    _step(layer, TO_0, TO_1, NOWHERE)
    _step(layer, TO_0, TO_1, NOWHERE)  # grows slot 2 at step 3
    _step(layer, TO_0, NOWHERE)  # mid-window records
    state = layer.state_dict()
    for key in ("active", "record_counts", "record_unrouted_sum", "idle_windows", "adaptive_step", "threshold"):
        assert f"router.{key}" in state
    fresh = _layer(update_every=3)
    fresh.load_state_dict(state)
    assert fresh.router.active.tolist() == [True, True, True, False]
    assert fresh.router.host_step == 4
    torch.testing.assert_close(fresh.router.record_counts, layer.router.record_counts)
    # both continue identically
    for model in (layer, fresh):
        _step(model, TO_0, TO_1)
        _step(model, TO_0, TO_1)
    assert fresh.router.active.tolist() == layer.router.active.tolist()


def test_routing_metrics_expose_active_experts_thresholds_and_k_histogram():
    layer = _layer()
    _step(layer, TO_0, TO_1, NOWHERE, _unit((0, 1.0), (1, 1.0)))
    scalars, hists = routing_metrics(layer)
    assert scalars["moe/layer_0/active_experts"] == 2
    assert scalars["moe/layer_0/threshold_mean"] == pytest.approx(0.0)
    assert scalars["moe/layer_0/unrouted_frac"] == pytest.approx(0.25)
    assert scalars["moe/layer_0/experts_per_token"] == pytest.approx((0 + 1 + 1 + 2) / 4)
    assert sorted(hists["moe/layer_0/experts_per_token_hist"].tolist()) == [0, 1, 1, 2]
    assert hists["moe/layer_0/thresholds"].shape == (2,)
    assert layer.router.k_hist.sum() == 0  # reset after reading
