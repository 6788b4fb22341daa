"""'dynamic' and 'controller' capacity policies: Tutel numbers, reductions, the closed loop."""

import pytest
import torch

from moe_dist.config import CapacityConfig, ConfigError, MoEConfig, RouterConfig
from moe_dist.moe import capacity as cap
from moe_dist.moe import capacity_dynamic as capd
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.routing.state import routing_metrics, update_after_step


def test_tutel_capacity_oracles():
    assert capd.tutel_capacity(1000, 8, 2, 1.25) == 312
    bound = capd.tutel_capacity(1000, 8, 2, 1.25)
    assert capd.dynamic_capacity(torch.tensor([400, 10, 0]), bound) == 312
    assert capd.dynamic_capacity(torch.tensor([200, 10, 0]), bound) == 200
    assert capd.dynamic_capacity(torch.tensor([200, 10, 0]), None) == 200
    assert capd.dynamic_capacity(torch.zeros(3, dtype=torch.long), None) == 1


def test_dynamic_capacity_uses_the_injected_max_reduction():
    calls = []

    def other_rank_has_450(t):  # stands in for an all-reduce MAX over the ep group
        calls.append(t.clone())
        return torch.maximum(t, torch.tensor([450]))

    assert capd.dynamic_capacity(torch.tensor([300, 7]), None, other_rank_has_450) == 450
    assert capd.dynamic_capacity(torch.tensor([300, 7]), 312, other_rank_has_450) == 312
    assert calls[0].tolist() == [300]


def test_dropped_assignments():
    assert capd.dropped_assignments(torch.tensor([5, 2, 0, 9]), 4).item() == 1 + 5


def _layer(policy, **capacity):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, router=RouterConfig(top_k=2, aux_loss_coef=0, z_loss_coef=0),
                    capacity=CapacityConfig(policy=policy, **capacity))
    return MoELayer(8, 16, cfg)


def test_layer_dynamic_unbounded_is_dropless_and_sized_by_the_busiest_expert():
    layer = _layer("dynamic", capacity_factor=0.0)
    x = torch.randn(2, 12, 8)
    routing = layer.route(x.view(-1, 8), seq_len=12)
    assert int(routing.valid.sum()) == 24 * 2  # nothing dropped
    assert layer.capacity_state.last_capacity == int(routing.tokens_per_expert.max())
    layer.capacity_reduce_fn = lambda t: torch.full_like(t, 40)  # a busier expert elsewhere
    layer.route(x.view(-1, 8), seq_len=12)
    assert layer.capacity_state.last_capacity == 40


def test_layer_dynamic_bounded_drops_like_fixed_at_the_bound():
    layer = _layer("dynamic", capacity_factor=0.5, drop_policy="position")
    x = torch.randn(64, 8)
    routing = layer.route(x, seq_len=None)
    bound = capd.tutel_capacity(64, 4, 2, 0.5)
    assert layer.capacity_state.last_capacity == min(bound, int(routing.tokens_per_expert.max()))
    expected = cap.apply_capacity(routing.indices, None, 4, bound)
    torch.testing.assert_close(routing.valid, expected)
    layer.train()
    layer(x.view(1, 64, 8))
    update_after_step(layer)
    dropped = capd.dropped_assignments(routing.tokens_per_expert, bound).item()
    assert layer.capacity_state.drop_rate.item() == pytest.approx(dropped / 128)


def _skewed_counts(generator, num_tokens=1024, top_k=2):
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])
    draws = torch.multinomial(probs, num_tokens * top_k, replacement=True, generator=generator)
    return torch.bincount(draws, minlength=8)


def _run_controller(cfg, steps):
    state = capd.CapacityState(cfg)
    generator = torch.Generator().manual_seed(0)
    rates, factors = [], []
    for _ in range(steps):
        counts = _skewed_counts(generator)
        state.record(counts, cap.expert_capacity(1024, 8, 2, state.factor))
        state.apply_step(state.step_routed.clone(), state.step_dropped.clone())
        rates.append(state.drop_rate.item())
        factors.append(state.factor)
    return rates, factors


def test_controller_reaches_the_target_drop_rate_within_40_steps():
    target = 0.01
    rates, factors = _run_controller(CapacityConfig(policy="controller", capacity_factor=1.0,
                                                    target_drop_rate=target), steps=120)
    assert rates[0] > 0.2  # starts far off: factor 1.0 on a skewed stream
    trailing = [sum(rates[i - 9:i + 1]) / 10 for i in range(9, len(rates))]
    first_in_band = next(i + 9 for i, r in enumerate(trailing) if 0.5 * target <= r <= 2 * target)
    assert first_in_band <= 40
    assert 0.5 * target <= sum(rates[-50:]) / 50 <= 1.5 * target  # and holds it
    assert max(factors) < 3.0


def test_controller_respects_the_memory_ceiling():
    rates, factors = _run_controller(CapacityConfig(policy="controller", capacity_factor=1.0,
                                                    target_drop_rate=0.01, max_capacity_factor=1.5), steps=40)
    assert max(factors) == pytest.approx(1.5)
    assert factors[-1] == pytest.approx(1.5) and rates[-1] > 0.01


def test_controller_state_is_checkpointed_reduced_and_used_at_eval():
    layer = _layer("controller", capacity_factor=1.0, target_drop_rate=0.0, eval_capacity_factor=3.0)
    layer.train()
    layer(torch.randn(1, 32, 8))
    seen = []

    def reduce_fn(t):
        seen.append(t.shape)
        return t * 2  # as if an identical second rank

    update_after_step(layer, reduce_fn)
    assert seen == [torch.Size([1, 2])]  # one reduction, [layers, (routed, dropped)]
    factor = layer.capacity_state.factor
    assert factor != 1.0
    state = layer.state_dict()
    assert "capacity_state.capacity_factor" in state and "capacity_state.step_routed" not in state

    fresh = _layer("controller", capacity_factor=1.0, target_drop_rate=0.0, eval_capacity_factor=3.0)
    fresh.load_state_dict(state)
    assert fresh.capacity_state.factor == pytest.approx(factor)
    assert fresh.capacity_for(32, 2) == cap.expert_capacity(32, 4, 2, factor)
    fresh.eval()
    assert fresh.capacity_for(32, 2) == cap.expert_capacity(32, 4, 2, 3.0)

    scalars, _ = routing_metrics(fresh)
    assert scalars["moe/layer_0/capacity_factor"] == pytest.approx(factor)
    assert "moe/layer_0/capacity_drop_rate" in scalars


def test_capacity_config_errors():
    with pytest.raises(ConfigError, match="capacity_factor"):
        CapacityConfig(policy="controller", capacity_factor=0.0)
    with pytest.raises(ConfigError, match="max_capacity_factor"):
        CapacityConfig(policy="controller", capacity_factor=5.0, max_capacity_factor=4.0)
    with pytest.raises(ConfigError, match="target_drop_rate"):
        CapacityConfig(policy="controller", target_drop_rate=1.0)
    with pytest.raises(ConfigError, match="controller_gain"):
        CapacityConfig(policy="controller", controller_gain=0.0)
    layer = _layer("dynamic")
    with pytest.raises(ValueError, match="tokens_per_expert"):
        layer.capacity_for(16, 2)
