"""Every router (and the dynamic capacity policies) trains a tiny LM: finite, decreasing loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import AdaptiveConfig, CapacityConfig, ModelConfig, MoEConfig, RouterConfig
from moe_dist.models.registry import build_model
from moe_dist.moe.routing import adaptive, state

CASES = {
    "expert_choice": (RouterConfig(type="expert_choice"), CapacityConfig()),
    "top_p": (RouterConfig(type="top_p", top_k=4, entropy_loss_coef=1e-4), CapacityConfig()),
    "xmoe": (RouterConfig(type="xmoe", top_k=4, seq_aux_loss_coef=1e-3), CapacityConfig()),
    "da_moe": (RouterConfig(type="da_moe", top_k=3), CapacityConfig()),
    "top_any": (RouterConfig(type="top_any", top_k=4), CapacityConfig()),
    "top_any_adaptive": (RouterConfig(type="top_any", top_k=4, adaptive=AdaptiveConfig(
        enabled=True, initial_experts=2, update_every=3, record_steps=2)), CapacityConfig()),
    "top_p_dynamic_bounded": (RouterConfig(type="top_p", top_k=4),
                              CapacityConfig(policy="dynamic", capacity_factor=1.0)),
    "xmoe_controller": (RouterConfig(type="xmoe", top_k=4),
                        CapacityConfig(policy="controller", capacity_factor=0.5, target_drop_rate=0.05)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_router_trains_a_tiny_model(name):
    router_cfg, capacity_cfg = CASES[name]
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=16)
    moe_cfg = MoEConfig(num_experts=4, router=router_cfg, capacity=capacity_cfg)
    model = build_model(model_cfg, moe_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, (4, 13))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(12):
        output = model(inputs)
        lm_loss = F.cross_entropy(output.logits.flatten(0, 1), targets.flatten())
        total = lm_loss + sum(output.losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        state.update_selection_bias_from_stats(model)  # bias, controllers, DynMoE decisions
        adaptive.reset_pending_optimizer_state(model, optimizer)
        losses.append(lm_loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
